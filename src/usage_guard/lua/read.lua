-- The raw data behind an org's usage in one call (after sweeping expired reservations).
-- KEYS[1] org hash, KEYS[2] budgets hash, KEYS[3] open reservations, KEYS[4] held
-- estimates, KEYS[5] personal counts of the current month, then the meters' hash of each
-- month of the history; ARGV[1] now (ms, by the guard's clock), ARGV[2..] the personal
-- fields wanted (<user>:<metric>).
-- Reply: {HGETALL org, budgets (HMGET), personal counts (HMGET), {HGETALL of each month},
--         HGETALL held (what open reservations hold, by counter_id: {} when none is
--         open): the client adds them, exactly}.

-- A hash read, or a data error naming a key of another type (an operator's SET typo).
local function read_hash(command, key, ...)
  local value = redis.pcall(command, key, ...)
  if type(value) == 'table' and value.err then
    if string.find(tostring(value.err), 'WRONGTYPE', 1, true) then
      return nil, redis.error_reply('UGDATA ' .. key .. '  holds no integer counter')
    end
    return nil, value
  end
  return value
end

local org, failure = read_hash('HGETALL', KEYS[1])
if not org then
  return failure
end
local due = false
for i = 1, #org, 2 do
  if org[i] == DUE then
    due = org[i + 1]
  end
end
local held, budgets, own, months = {}, {}, {}, {}
if sweep(KEYS[3], KEYS[4], ARGV[1], due) then
  held = redis.call('HGETALL', KEYS[4])
end
if #ARGV > 1 then
  budgets, failure = read_hash('HMGET', KEYS[2], unpack(ARGV, 2))
  if not budgets then
    return failure
  end
  own, failure = read_hash('HMGET', KEYS[5], unpack(ARGV, 2))
  if not own then
    return failure
  end
end
for i = 6, #KEYS do
  local month
  month, failure = read_hash('HGETALL', KEYS[i])
  if not month then
    return failure
  end
  months[i - 5] = month
end
return {org, budgets, own, months, held}
