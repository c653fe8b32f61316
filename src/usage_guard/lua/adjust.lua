-- Unchecked changes (MODE): 'settle' / 'cancel' a reservation (KEYS[EXTRA_KEY], FLAGS 'r'),
-- 'release' (subtract) or 'set' a cumulative value. Counters never go below 0, and a
-- counter that is gone (expired) is never made again by taking from it.
-- A reservation still open gives back what it holds; settling counts the actual amounts,
-- open or expired (then once, as a plain consumption); cancelling an expired one does
-- nothing.
-- Reply: {done (1, or 0 for a reservation already settled or cancelled, or cancelled
--         after it expired), then name, threshold, used, limit for each threshold reached}.

local metrics, _, due = load_metrics()
local open = sweep(RESERVATIONS, HELD, ARGV[6], due)
-- Every counter is read before anything is written: a key that holds no integer (an
-- operator's SET typo, another type) is reported, and nothing is half applied.
for _, m in ipairs(metrics) do
  local failure
  m.count, failure = read(m.key)
  if not m.count then
    return failed(m.key, failure)
  end
  m.own_count = 0
  if m.personal then
    m.own_count, failure = read(m.other)
    if not m.own_count then
      return failed(m.other, failure)
    end
  end
end

local deltas = {}
if FLAGS == 'r' then
  local record = KEYS[EXTRA_KEY]
  local entry = redis.call('GET', record)
  if not entry then
    return {0}
  end
  redis.call('DEL', record)
  local holding = open and redis.call('ZREM', RESERVATIONS, entry) == 1
  if holding then
    release(HELD, entry)
    open = redis.call('EXISTS', RESERVATIONS) == 1
    if not open then
      redis.call('HDEL', KEYS[1], DUE)
    end
  end
  if MODE == 'cancel' then
    return {holding and 1 or 0}
  end
  for i, m in ipairs(metrics) do
    deltas[i] = m.amount
  end
else
  for i, m in ipairs(metrics) do
    deltas[i] = MODE == 'release' and -m.amount or m.amount - m.count
  end
end
if open then
  load_held(metrics)
end

local reply = {1}
for i, m in ipairs(metrics) do
  local delta = deltas[i]
  local used = m.count
  if delta > 0 or (MODE == 'set' and delta ~= 0) then
    if MODE == 'set' then
      -- Exact whatever the counter held: past MAX (an unlimited meter) deltas would round.
      used = m.amount
      redis.call('SET', m.key, string.format('%d', used))
    else
      used = redis.call('INCRBY', m.key, delta)
      if m.monthly then
        expire_if_new(m.key, used, delta, m.ttl)
      end
    end
    if m.personal then
      local mine = redis.call('INCRBY', m.other, delta)
      expire_if_new(m.other, mine, delta, m.ttl)
    end
  elseif delta < 0 then
    if m.count > 0 then
      used = redis.call('DECRBY', m.key, math.min(m.count, -delta))
    end
    if m.personal and m.own_count > 0 then
      redis.call('DECRBY', m.other, math.min(m.own_count, -delta))
    end
  end
  if used ~= m.count and not m.monthly then
    remember(m.other, used, m.keep)
  end
  if delta > 0 then
    reach_thresholds(m, used + m.held, reply)
  end
end
return reply
