-- The raw data behind an org's usage in one call.
-- KEYS[1] org hash, KEYS[2] budgets hash, then ARGV[1] string keys (counters, gauges),
-- then history hashes; ARGV[2..] the budget fields wanted.
-- Reply: {HGETALL org, budgets (HMGET), values (MGET), {HGETALL of each history hash}}.

local strings = tonumber(ARGV[1])
local values, budgets, histories = {}, {}, {}
if strings > 0 then
  values = redis.call('MGET', unpack(KEYS, 3, 2 + strings))
end
if #ARGV > 1 then
  budgets = redis.call('HMGET', KEYS[2], unpack(ARGV, 2))
end
for i = 3 + strings, #KEYS do
  histories[#histories + 1] = redis.call('HGETALL', KEYS[i])
end
return {redis.call('HGETALL', KEYS[1]), budgets, values, histories}
