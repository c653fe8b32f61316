-- Open reservations, which every script sweeps first (prepended to each of them).
--
-- An open reservation's estimate is held apart from the counters, in two keys of the
-- org that every call declares: 'reservations', a sorted set of open reservations by
-- deadline (ms, by the guards' clock), and 'held', a hash from a counter (see
-- counter_id, e.g. 'm:2026-11:ai_tokens') to the estimates held against it. A meter's
-- usage is its counter plus what is held against it, so a reservation that expires is
-- refunded by taking its entry out of those two keys, whichever counters it held
-- against: no other key is touched, none recreated.
-- An entry is "r:<id>\t<counter>=<amount>..." for every counter it holds against; the
-- reservation's own key (r:<id>) keeps the same string until settled or cancelled.
-- Every script declares the org's hash as KEYS[1].

-- A key's name after the org's base (KEYS[1], the org hash, is "<base>org").
local function suffix(key)
  return string.sub(key, #KEYS[1] - 2)
end

-- The name 'held' files a counter under: its hash's name after the org's base, then
-- its field ('m:2026-11:ai_tokens', 'u:2026-11:alice:ai_tokens', 'org:contacts').
local function counter_id(hash, field)
  return suffix(hash) .. ':' .. field
end

-- Give back what an entry holds.
local function release(held, entry)
  for field, amount in string.gmatch(entry, '\t([^=]+)=(%d+)') do
    if redis.call('HINCRBY', held, field, '-' .. amount) <= 0 then
      redis.call('HDEL', held, field)
    end
  end
end

-- The org hash's field holding the earliest deadline of its open reservations, absent
-- when none is open (it may be earlier than the true one, never later): every consume
-- reads it with the org's plan, so an org with nothing due costs no other read.
local DUE = 'reservations:due'

-- Release every reservation of the org (KEYS[1] is its hash) whose deadline is at or
-- before now (ms, a decimal string); due is the org's DUE field. Returns whether one is
-- still open.
local function sweep(reservations, held, now, due)
  if not due then
    return false
  end
  now = tonumber(now)
  if tonumber(due) > now then
    return true
  end
  for _, entry in ipairs(redis.call('ZRANGEBYSCORE', reservations, '-inf', now)) do
    release(held, entry)
  end
  redis.call('ZREMRANGEBYSCORE', reservations, '-inf', now)
  local first = redis.call('ZRANGE', reservations, 0, 0, 'WITHSCORES')
  if #first == 0 then
    redis.call('HDEL', KEYS[1], DUE)
    return false
  end
  redis.call('HSET', KEYS[1], DUE, first[2])
  return true
end
