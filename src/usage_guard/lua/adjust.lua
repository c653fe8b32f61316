-- Unchecked changes (MODE): 'settle' / 'cancel' a reservation (KEYS[EXTRA_KEY], FLAGS 'r'),
-- 'release' (subtract) or 'set' a cumulative value. Counters never go below 0.
-- Reply: {done (1, or 0 for a reservation already settled), then name, threshold,
--         used, limit for each threshold reached}.

-- Add delta to a counter, never below 0.
local function add(key, delta, monthly)
  local value = redis.call('INCRBY', key, delta)
  if monthly then
    expire_if_new(key, value, delta)
  end
  if value < 0 then
    redis.call('INCRBY', key, -value)
    value = 0
  end
  return value
end

local metrics = load_metrics()
-- Every counter is checked before anything is written: a key that holds no integer
-- (an operator's SET typo, another type) is reported, and nothing is half applied.
for _, m in ipairs(metrics) do
  for _, key in ipairs(m.personal and {m.key, m.other} or {m.key}) do
    local value, failure = read(key)
    if not value then
      return failed(key, failure)
    end
  end
end
local deltas = {}
if FLAGS == 'r' then
  local names = {}
  for i, m in ipairs(metrics) do
    names[i] = m.name
  end
  local estimates = redis.call('HMGET', KEYS[EXTRA_KEY], unpack(names))
  if redis.call('DEL', KEYS[EXTRA_KEY]) == 0 then
    return {0}
  end
  for i, m in ipairs(metrics) do
    local estimate = tonumber(estimates[i] or '0')
    deltas[i] = MODE == 'cancel' and -estimate or m.amount - estimate
  end
else
  for i, m in ipairs(metrics) do
    if MODE == 'release' then
      deltas[i] = -m.amount
    else
      deltas[i] = m.amount - tonumber(redis.call('GET', m.key) or '0')
    end
  end
end

local reply = {1}
for i, m in ipairs(metrics) do
  local delta = deltas[i]
  if delta ~= 0 then
    local used
    if MODE == 'set' then
      -- Exact whatever the counter held: past MAX (an unlimited meter) deltas would round.
      used = m.amount
      redis.call('SET', m.key, string.format('%d', used))
    else
      used = add(m.key, delta, m.monthly)
    end
    if m.personal then
      add(m.other, delta, true)
    end
    if not m.monthly then
      remember(m.other, used, m.keep)
    end
    if delta > 0 then
      reach_thresholds(m, used, reply)
    end
  end
end
return reply
