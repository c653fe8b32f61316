-- Shared by consume.lua and adjust.lua (prepended when the scripts are loaded, after
-- _reservations.lua).
--
-- The meters of an org live in few hashes (see keys.py): a monthly metric's count in
-- the hash of its month (field: the metric's name), a cumulative metric's current value
-- in the org's hash and its last value of each month in that month's hash, the highest
-- threshold a meter reached in a month in that month's hash too (field t:<metric>), and
-- personal counts of the current month in a hash of their own (field: <user>:<metric>).
--
-- Common arguments:
--   KEYS[1] org hash, KEYS[2] budgets hash, KEYS[3] open reservations, KEYS[4] held
--   estimates (see _reservations.lua), KEYS[5] meters of the current month, KEYS[6]
--   meters of the month before, KEYS[7] meters of the month monthly metrics are counted
--   in (KEYS[5] but when a reservation or a refund belongs to an earlier month), KEYS[8]
--   personal counts of the current month, KEYS[9] those of the month before, then the
--   script's extra keys.
--   ARGV[1] current period (YYYY-MM), ARGV[2] TTL of its keys (s), ARGV[3] the org's
--   plan as the client believes it is stored ('' for none), ARGV[4] mode, ARGV[5] user
--   id ('' for none), ARGV[6] now (ms, by the guard's clock), ARGV[7] the mode's own
--   number ('reserve': the reservation's deadline, ms; 'settle' / 'cancel': the TTL of
--   the keys of the month the reservation was counted in; else 0), ARGV[8] the moment
--   its caller gives up on a consumption (ms, by Redis's clock; 0: never), ARGV[9] what
--   that caller was then told ('count': served, 'skip': refused; see consume.lua), then
--   four per metric: name, amount, personal (1/0: counted for USER) and its spec,
--   "<monthly 1/0>:<percent of the limit admitted>:<limit>:<quota>:<80 % threshold>" of
--   the plan the client believes the org is on ("...:-" when it leaves the metric
--   unlimited): the client computes what a limit implies once, so a call only scales a
--   limit that an org overrides, and its cost does not grow with the number of plans.
--   Few arguments on purpose: clients pack every one of them on every call.
-- When the org's stored plan is not ARGV[3] (it was assigned by another process), a
-- script changes nothing and replies {4, stored plan ('' for none)}: the client learns
-- the plan and calls again.
-- Settling or cancelling a reservation made in an earlier month leaves its monthly
-- counts in that month and no personal count (only the current month's is ever read);
-- cumulative meters change now, so their history and thresholds belong to the current
-- period.
-- Lua numbers are doubles: every value stays within 0..2^53-1 (MAX), and
-- limits are scaled from their decimal strings so the arithmetic stays exact.

local MAX = 9007199254740991
local PERIOD = ARGV[1]
local TTL = tonumber(ARGV[2])
local MODE = ARGV[4]
local USER = ARGV[5]
local RESERVATIONS, HELD = KEYS[3], KEYS[4]
local METERS, LAST_METERS, COUNTED = KEYS[5], KEYS[6], KEYS[7]
local OWN, LAST_OWN = KEYS[8], KEYS[9]
local FIRST_METRIC = 10
local NMETRICS = (#ARGV - FIRST_METRIC + 1) / 4
local EXTRA_KEY = 10
local STALE_PLAN = 4
-- 'i': the extra key remembers an idempotent consumption; 'r': it is a reservation.
local FLAGS = ''
if MODE == 'idempotent' then
  FLAGS = 'i'
elseif MODE == 'reserve' or MODE == 'settle' or MODE == 'cancel' then
  FLAGS = 'r'
end

-- floor(limit * percent / 100) (ceil when round_up) for a decimal string limit, clamped to MAX.
local function scaled(limit, percent, round_up)
  local high, low = 0, tonumber(limit)
  if #limit > 2 then
    high = tonumber(string.sub(limit, 1, -3))
    low = tonumber(string.sub(limit, -2))
  end
  local part = math.floor(low * percent / 100)
  if round_up and part * 100 < low * percent then
    part = part + 1
  end
  local value = high * percent + part
  if value > MAX then
    return MAX
  end
  return value
end

-- The metrics of the call, with their org limit resolved: override, else plan, else none.
-- Returns the metrics and the org's earliest reservation deadline (see
-- _reservations.lua), or nil and the stored plan when it is not the one the client sent.
local function load_metrics()
  local fields = {'plan', DUE}
  for i = 1, NMETRICS do
    fields[i + 2] = 'limit:' .. ARGV[FIRST_METRIC + 4 * i - 4]
  end
  local stored = redis.call('HMGET', KEYS[1], unpack(fields))
  if (stored[1] or '') ~= ARGV[3] then
    return nil, stored[1] or ''
  end
  local metrics = {}
  for i = 1, NMETRICS do
    local at = FIRST_METRIC + 4 * i - 4
    local name = ARGV[at]
    local spec = ARGV[at + 3]
    local monthly = string.byte(spec) == 49
    -- limit false: unlimited; quota: the most admitted; alert: the first threshold (80 %).
    -- hash, field: the meter's counter; own_hash, own_field: its personal counter (false
    -- when not counted for a user).
    local personal = ARGV[at + 2] == '1' and COUNTED == METERS
    local m = {
      name = name, amount = tonumber(ARGV[at + 1]), monthly = monthly, personal = personal,
      hash = monthly and COUNTED or KEYS[1], field = name,
      own_hash = OWN, own_field = personal and USER .. ':' .. name,
      limit = false, limit_text = false, quota = MAX, alert = MAX,
      held = 0, held_own = 0,
    }
    -- earlier: counted in an earlier month, whose keys' TTL is ttl (the call's own when
    -- nil, as on every consume).
    if monthly and COUNTED ~= METERS then
      m.earlier, m.ttl = true, tonumber(ARGV[7])
    end
    local override = stored[i + 2]
    if override then
      if override ~= '' and override ~= 'null' then
        local percent = tonumber(string.match(spec, '^%d:(%d+)'))
        m.limit, m.limit_text = tonumber(override), override
        m.quota, m.alert = scaled(override, percent, false), scaled(override, 80, true)
      end
    else
      local limit, quota, alert = string.match(spec, '^%d:%d+:(%d+):(%d+):(%d+)$')
      if limit then
        m.limit, m.limit_text = tonumber(limit), limit
        m.quota, m.alert = tonumber(quota), tonumber(alert)
      end
    end
    metrics[i] = m
  end
  return metrics, stored[2]
end

-- Whether a redis.pcall error says the field holds no integer (an operator's HSET typo,
-- a key of another type) rather than that Redis cannot write now (OOM, READONLY, ...).
local function not_a_counter(failure)
  local message = tostring(failure.err)  -- fakeredis hands a Python object over
  return string.find(message, 'WRONGTYPE', 1, true) ~= nil
    or string.find(message, 'not an integer', 1, true) ~= nil
end

-- HINCRBY, or nil and the error: the caller takes back what it counted and reports it,
-- so nothing is half applied.
local function incr(hash, field, amount)
  local value = redis.pcall('HINCRBY', hash, field, amount)
  if type(value) == 'table' then
    return nil, value
  end
  return value
end

-- A counter's value (0 when absent), or nil and the error when it cannot be read as one.
local function read(hash, field)
  local value = redis.pcall('HGET', hash, field)
  if type(value) == 'table' then
    return nil, value
  end
  local number = tonumber(value or '0')
  if not number then
    return nil, {err = 'not an integer'}
  end
  return number
end

-- The error reply for a failed counter: the key and field named when it holds no
-- integer (the key alone when it is of another type), else Redis's own error (an outage such as OOM, which the client's policy
-- answers).
local function failed(hash, field, failure)
  if not_a_counter(failure) then
    if string.find(tostring(failure.err), 'WRONGTYPE', 1, true) then
      field = ''  -- the key as a whole: it holds no hash
    end
    return redis.error_reply('UGDATA ' .. hash .. ' ' .. field
      .. ' holds no integer counter: nothing was counted')
  end
  return failure
end

-- Take delta (< 0) back from a counter; a field back at 0 goes, so that no hash keeps
-- what a denied call made.
local function decr(hash, field, delta)
  local value = redis.call('HINCRBY', hash, field, delta)
  if value == 0 then
    redis.call('HDEL', hash, field)
  end
  return value
end

-- A month's hash that adding delta to a field made (its value is delta) expires with
-- the history window; so does the current month's personal hash, whose first count of
-- the month drops the month before's (only the current month's is read).
local function expire_if_new(hash, value, delta, ttl)
  if value == delta then
    redis.call('EXPIRE', hash, ttl or TTL)
    if hash == OWN then
      redis.call('DEL', LAST_OWN)
    end
  end
end

-- The names 'held' files a meter's org and personal counters under (see _reservations.lua).
local function held_ids(m)
  local id = counter_id(m.hash, m.field)
  return id, m.personal and counter_id(m.own_hash, m.own_field) or id
end

-- What open reservations hold against each metric's counters: m.held (org) and
-- m.held_own (personal), left at 0 by load_metrics when none is open.
local function load_held(metrics)
  local fields = {}
  for i, m in ipairs(metrics) do
    fields[2 * i - 1], fields[2 * i] = held_ids(m)
  end
  local held = redis.call('HMGET', HELD, unpack(fields))
  for i, m in ipairs(metrics) do
    m.held = tonumber(held[2 * i - 1] or '0')
    if m.personal then
      m.held_own = tonumber(held[2 * i] or '0')
    end
  end
end

-- A cumulative meter changed from before to value: its last value of the month goes in
-- the month's hash. A month with no value of its own has the one before it; so the
-- first change of a month after one without a value also records the value the month
-- started from (s:<metric>, when not 0), which the months before show.
local function remember(m, value, before)
  if redis.call('HSET', METERS, m.name, value) == 1 then
    redis.call('EXPIRE', METERS, TTL)
    if before ~= 0 and redis.call('HEXISTS', LAST_METERS, m.name) == 0 then
      redis.call('HSET', METERS, 's:' .. m.name, before)
    end
  end
end

-- Thresholds (80/90/100 % of the limit) newly reached by an org meter whose usage went
-- from before to used, each recorded once per month (t:<metric> in the month's hash:
-- the highest reached); appended to reply as name, threshold, used, limit. A change
-- counted in an earlier month (a late settle) reports the thresholds it crossed.
local function reach_thresholds(m, used, before, reply)
  -- Most calls stay below the first threshold: they need no read of the record.
  if not m.limit or m.limit == 0 or used < m.alert then
    return
  end
  local field = 't:' .. m.name
  local fired, floor = 0, before
  if not m.earlier then
    fired, floor = tonumber(redis.call('HGET', METERS, field) or '0'), -1
  end
  local highest = fired
  for _, threshold in ipairs({80, 90, 100}) do
    local value = scaled(m.limit_text, threshold, true)
    if threshold > fired and used >= value and value > floor then
      highest = threshold
      local n = #reply
      reply[n + 1], reply[n + 2], reply[n + 3], reply[n + 4] = m.name, threshold, used, m.limit
    end
  end
  if not m.earlier and highest > fired then
    if redis.call('HSET', METERS, field, highest) == 1 then
      redis.call('EXPIRE', METERS, TTL)
      redis.call('HDEL', LAST_METERS, field)  -- only the current month's is read
    end
  end
end
