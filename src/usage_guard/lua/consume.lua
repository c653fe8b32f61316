-- consume / idempotent / check / reserve (MODE): check every metric, then count all or none.
-- FLAGS 'i': KEYS[EXTRA_KEY] remembers an admitted consumption for 24 h (idempotency);
-- FLAGS 'r': the estimates are held, not counted, until the reservation's deadline
-- (ARGV[7]); KEYS[EXTRA_KEY] records them until it is settled or cancelled.
-- Reply: {admitted (1/0), metric, scope, used, limit (-1: none), quota (-1: none),
--         the amount asked of that metric, {name, scope, used, limit, quota, amount of
--         each other metric (admitted only)}, then name, threshold, used, limit for each
--         threshold reached}; a denial by a personal budget ends after the amount; an
--         idempotent replay is {2, stored}; a late call (see below) {3}; a stale plan
--         (see _lib.lua) {4, plan}.

local function fits(used, amount, quota)
  return used <= quota and amount <= quota - used
end

-- Hold an admitted reservation's estimates until its deadline (see _reservations.lua);
-- its record keeps the entry until it is settled or cancelled. Returns an error reply,
-- having held nothing, when a sum would not fit Redis's integers (estimates of
-- unlimited meters near 2^63).
local function hold(metrics, record)
  local entry = {suffix(record)}
  for _, m in ipairs(metrics) do
    if m.amount > 0 then
      local org_id, own_id = held_ids(m)
      for _, id in ipairs(m.personal and {org_id, own_id} or {org_id}) do
        local amount = string.format('%d', m.amount)
        local sum = redis.pcall('HINCRBY', HELD, id, amount)
        if type(sum) == 'table' then
          release(HELD, table.concat(entry, '\t'))
          return sum
        end
        entry[#entry + 1] = id .. '=' .. amount
      end
    end
  end
  entry = table.concat(entry, '\t')
  local deadline = tonumber(ARGV[7])
  local keep = math.max(TTL, math.ceil((deadline - tonumber(ARGV[6])) / 1000))
  redis.call('ZADD', RESERVATIONS, deadline, entry)
  local due = redis.call('HGET', KEYS[1], DUE)
  if not due or deadline < tonumber(due) then
    redis.call('HSET', KEYS[1], DUE, ARGV[7])
  end
  redis.call('SET', record, entry, 'EX', keep)
  -- The two keys expire together (an estimate held with no entry left to release it
  -- would count for ever), after the last deadline and with the period's counters.
  local index_ttl, held_ttl = redis.call('TTL', RESERVATIONS), redis.call('TTL', HELD)
  if index_ttl ~= held_ttl or index_ttl < keep then
    keep = math.max(keep, index_ttl, held_ttl)
    redis.call('EXPIRE', RESERVATIONS, keep)
    redis.call('EXPIRE', HELD, keep)
  end
end

-- A consumption that runs after its caller gave up on it (ARGV[8], by Redis's clock:
-- it waited in a hung server's queue, or behind a slow call) does what the caller was
-- told instead: 'skip' (refused: nothing changes) or 'count' (served: counted, never
-- denied, so billing stays true; the thresholds it crosses are reported by the next call
-- that is admitted or denied by the org's limit).
-- Reply: {3}, which a client still waiting reads as the outage policy's answer.
local late = false
if ARGV[8] ~= '0' then
  local now = redis.call('TIME')
  late = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) >= tonumber(ARGV[8])
  if late and ARGV[9] ~= 'count' then
    return {3}
  end
end

local extra = KEYS[EXTRA_KEY]
local metrics, due = load_metrics()
if not metrics then
  return {STALE_PLAN, due}
end
if sweep(RESERVATIONS, HELD, ARGV[6], due) then
  load_held(metrics)
end
if FLAGS == 'i' then
  local stored = redis.call('GET', extra)
  if stored then
    return {2, stored}
  end
end
local budgets, personal = {}, false
for _, m in ipairs(metrics) do
  personal = personal or m.personal
end
if personal then
  local fields = {}
  for i, m in ipairs(metrics) do
    fields[i] = USER .. ':' .. m.name
  end
  budgets = redis.call('HMGET', KEYS[2], unpack(fields))
end

-- Counting comes first and checking after: the reply of INCRBY is the read, so an
-- admitted call costs no GET. A denial takes back what this call counted (a script runs
-- alone, so nobody sees the difference). 'check', 'reserve' (a reservation holds its
-- estimate apart, see _reservations.lua) and amounts of 0 only read.
local counting = MODE ~= 'check' and MODE ~= 'reserve'

-- Undo the counts of metrics 1..upto; returns metric upto's org and own usage as they were.
local function take_back(upto)
  local used, own
  for i = 1, upto do
    local m = metrics[i]
    if m.counted then
      used = decr(m.hash, m.field, -m.amount) + m.held
      if m.personal then
        own = decr(m.own_hash, m.own_field, -m.amount) + m.held_own
      end
    else
      used, own = m.used, m.own
    end
  end
  return used, own
end

-- The personal budget is checked before the org limit: it names the scope of a denial.
-- m.used / m.own: usage, what is held included (the counter is m.used - m.held);
-- used / own: usage before this call (m.used / m.own after it when counted and admitted).
for i, m in ipairs(metrics) do
  local used, own
  if counting and m.amount > 0 then
    local count, failure = incr(m.hash, m.field, m.amount)
    if not count then
      take_back(i - 1)
      return failed(m.hash, m.field, failure)
    end
    m.counted, m.used = true, count + m.held
    used = m.used - m.amount
    if m.personal then
      count, failure = incr(m.own_hash, m.own_field, m.amount)
      if not count then
        m.personal = false  -- only its org counter to take back
        take_back(i)
        return failed(m.own_hash, m.own_field, failure)
      end
      m.own = count + m.held_own
      own = m.own - m.amount
    end
  else
    local count, mine, failure = nil, 0, nil
    count, failure = read(m.hash, m.field)
    local hash, field = m.hash, m.field
    if count and m.personal then
      mine, failure = read(m.own_hash, m.own_field)
      hash, field = m.own_hash, m.own_field
    end
    if not (count and mine) then
      take_back(i - 1)
      return failed(hash, field, failure)
    end
    m.used, m.own = count + m.held, mine + m.held_own
    used, own = m.used, m.own
  end
  if m.personal and not late then
    m.budget = budgets[i] and tonumber(budgets[i])
    if m.budget and not fits(own, m.amount, m.budget) then
      local _, before = take_back(i)
      return {0, m.name, 'personal', before, m.budget, m.budget, m.amount}
    end
  end
  -- An unlimited meter admits everything, even past MAX (its quota stands at MAX).
  if not late and m.limit and not fits(used, m.amount, m.quota) then
    local before = take_back(i)
    -- A threshold that a late call crossed (it reports none) is reported here, by the
    -- first call that finds the meter full.
    local denial = {0, m.name, 'organization', before, m.limit or -1, m.limit and m.quota or -1,
                    m.amount, {}}
    if MODE ~= 'check' then  -- a check changes nothing
      reach_thresholds(m, before, before, denial)
    end
    return denial
  end
end

for _, m in ipairs(metrics) do
  if m.counted then
    local count = m.used - m.held
    if m.monthly then
      expire_if_new(m.hash, count, m.amount)
    else
      remember(m, count, count - m.amount)
    end
    if m.personal then
      expire_if_new(m.own_hash, m.own - m.held_own, m.amount)
    end
  end
end

-- 'check' answers what 'consume' would have, 'reserve' what it holds: usage with the
-- amount in it.
if not counting then
  for _, m in ipairs(metrics) do
    m.used = m.used + m.amount
    if m.personal then
      m.own = m.own + m.amount
    end
  end
end

-- An admitted metric's binding budget: the personal one if it leaves less. Usage is
-- reported up to MAX: past it (unlimited meters only) a double no longer counts exactly.
local function binding(m)
  if m.budget and (not m.limit or m.budget - m.own < m.quota - m.used) then
    return 'personal', math.min(m.own, MAX), m.budget, m.budget
  end
  return 'organization', math.min(m.used, MAX), m.limit or -1, m.limit and m.quota or -1
end

-- The decision describes the first metric; the others' budgets follow, so that a
-- response can carry the fields of every metric it consumed.
local first = metrics[1]
local scope, used, limit, quota = binding(first)
local others = {}
for i = 2, #metrics do
  local m, n = metrics[i], #others
  others[n + 1], others[n + 6] = m.name, m.amount
  others[n + 2], others[n + 3], others[n + 4], others[n + 5] = binding(m)
end
local reply = {1, first.name, scope, used, limit, quota, first.amount, others}
if MODE == 'check' then
  return reply
end

if FLAGS == 'i' then
  -- "<metric>\t<o|p>\t<used>\t<limit>\t<quota>\t<YYYY-MM>\t<amount>": short, as there may
  -- be millions (the scope by its initial: organization or personal).
  redis.call('SET', extra, string.format('%s\t%s\t%d\t%d\t%d\t%s\t%d', first.name,
    string.sub(scope, 1, 1), used, limit, quota, PERIOD, first.amount), 'EX', 86400)
elseif FLAGS == 'r' then
  local failure = hold(metrics, extra)
  if failure then
    return failure
  end
end
if late then
  return {3}
end
for _, m in ipairs(metrics) do
  if m.amount > 0 then
    reach_thresholds(m, m.used, m.used - m.amount, reply)
  end
end
return reply
