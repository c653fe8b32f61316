-- Unchecked changes (MODE): 'settle' / 'cancel' a reservation (KEYS[EXTRA_KEY], FLAGS 'r'),
-- 'release' (subtract) or 'set' a cumulative value. Counters never go below 0, and a
-- counter that is gone (expired) is never made again by taking from it.
-- A reservation still open gives back what it holds; settling counts the actual amounts,
-- open or expired (then once, as a plain consumption); cancelling an expired one does
-- nothing.
-- Reply: {done (1, or 0 for a reservation already settled or cancelled, or cancelled
--         after it expired), then name, threshold, used, limit for each threshold reached};
--         a stale plan (see _lib.lua) {4, plan}.

local metrics, due = load_metrics()
if not metrics then
  return {STALE_PLAN, due}
end
local open = sweep(RESERVATIONS, HELD, ARGV[6], due)
-- Every counter is read before anything is written: a key that holds no integer (an
-- operator's SET typo, another type) is reported, and nothing is half applied.
for _, m in ipairs(metrics) do
  local failure
  m.count, failure = read(m.hash, m.field)
  if not m.count then
    return failed(m.hash, m.field, failure)
  end
  m.own_count = 0
  if m.personal then
    m.own_count, failure = read(m.own_hash, m.own_field)
    if not m.own_count then
      return failed(m.own_hash, m.own_field, failure)
    end
  end
end

-- deltas: each counter's change; released: what the settled reservation held, by
-- counter (its usage before the settle includes it).
local deltas, released = {}, {}
if FLAGS == 'r' then
  local record = KEYS[EXTRA_KEY]
  local entry = redis.call('GET', record)
  if not entry then
    return {0}
  end
  redis.call('DEL', record)
  local holding = open and redis.call('ZREM', RESERVATIONS, entry) == 1
  if holding then
    for id, amount in string.gmatch(entry, '\t([^=]+)=(%d+)') do
      released[id] = tonumber(amount)
    end
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
      redis.call('HSET', m.hash, m.field, string.format('%d', used))
    else
      used = redis.call('HINCRBY', m.hash, m.field, delta)
      if m.monthly then
        expire_if_new(m.hash, used, delta, m.ttl)
      end
    end
    if m.personal then
      local mine = redis.call('HINCRBY', m.own_hash, m.own_field, delta)
      expire_if_new(m.own_hash, mine, delta)
    end
  elseif delta < 0 then
    if m.count > 0 then
      used = decr(m.hash, m.field, -math.min(m.count, -delta))
    end
    if m.personal and m.own_count > 0 then
      decr(m.own_hash, m.own_field, -math.min(m.own_count, -delta))
    end
  end
  if used ~= m.count and not m.monthly then
    remember(m, used, m.count)
  end
  if delta > 0 then
    local before = m.count + m.held + (released[counter_id(m.hash, m.field)] or 0)
    reach_thresholds(m, used + m.held, before, reply)
  end
end
return reply
