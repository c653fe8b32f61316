-- The raw data behind an org's usage in one call (after sweeping expired reservations).
-- KEYS[1] org hash, KEYS[2] budgets hash, KEYS[3] open reservations, KEYS[4] held
-- estimates, then string keys (counters, gauges), then history hashes;
-- ARGV[1] now (ms, by the guard's clock), ARGV[2] the number of string keys,
-- ARGV[3..] the budget fields wanted.
-- Reply: {HGETALL org, budgets (HMGET), values (MGET), {HGETALL of each history hash},
--         what open reservations hold against each value's counter (HMGET, or {} when
--         none is open): the client adds them, exactly}.

local strings = tonumber(ARGV[2])
local org = redis.call('HGETALL', KEYS[1])
local due = false
for i = 1, #org, 2 do
  if org[i] == DUE then
    due = org[i + 1]
  end
end
local open = sweep(KEYS[3], KEYS[4], ARGV[1], due)
local values, budgets, histories, held = {}, {}, {}, {}
if strings > 0 then
  values = redis.call('MGET', unpack(KEYS, 5, 4 + strings))
  if open then
    local fields = {}
    for i = 1, strings do
      fields[i] = held_field(KEYS[4 + i], KEYS[1])
    end
    held = redis.call('HMGET', KEYS[4], unpack(fields))
  end
end
if #ARGV > 2 then
  budgets = redis.call('HMGET', KEYS[2], unpack(ARGV, 3))
end
for i = 5 + strings, #KEYS do
  histories[#histories + 1] = redis.call('HGETALL', KEYS[i])
end
return {org, budgets, values, histories, held}
