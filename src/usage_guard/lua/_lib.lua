-- Shared by consume.lua and adjust.lua (prepended when the scripts are loaded, after
-- _reservations.lua).
--
-- Common arguments:
--   KEYS[1] org hash, KEYS[2] budgets hash, KEYS[3] thresholds hash of the period,
--   KEYS[4] open reservations, KEYS[5] held estimates (see _reservations.lua), then two
--   keys per metric (monthly: org counter, personal counter or the counter again;
--   cumulative: gauge, history hash), then the script's extra keys.
--   ARGV[1] period of the change (YYYY-MM), ARGV[2] TTL of that period's keys (s),
--   ARGV[3] the default plan ('' for none), ARGV[4] mode, ARGV[5] user id ('' for none),
--   ARGV[6] now (ms, by the guard's clock), ARGV[7] the mode's own number ('reserve':
--   the reservation's deadline, ms; 'settle' / 'cancel': the TTL of the keys of the
--   period the reservation was counted in; else 0), ARGV[8] the moment its caller gives
--   up on a consumption (ms, by Redis's clock; 0: never), ARGV[9] what that caller was
--   then told ('count': served, 'skip': refused; see consume.lua), then four per metric: name,
--   amount, personal (1/0: counted for USER) and its spec,
--   "<monthly 1/0>:<percent of the limit admitted>:<months of history kept>\n"
--   followed by "<plan>=<limit>:<quota>:<80 % threshold>\n" for every configured plan
--   ("<plan>=-\n" = unlimited): the client computes what a plan's limit implies once,
--   so a call only scales a limit that an org overrides.
--   Few arguments on purpose: clients pack every one of them on every call.
-- Settling or cancelling a reservation made in an earlier month leaves its monthly
-- counters (and their thresholds: KEYS[EXTRA_KEY + 1]) in that month; cumulative
-- meters change now, so their history and thresholds belong to the current period.
-- Lua numbers are doubles: every value stays within 0..2^53-1 (MAX), and
-- limits are scaled from their decimal strings so the arithmetic stays exact.

local MAX = 9007199254740991
local PERIOD = ARGV[1]
local TTL = tonumber(ARGV[2])
local DEFAULT_PLAN = ARGV[3]
local MODE = ARGV[4]
local USER = ARGV[5]
local RESERVATIONS, HELD = KEYS[4], KEYS[5]
local NMETRICS = (#ARGV - 9) / 4
local EXTRA_KEY = 6 + 2 * NMETRICS
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

-- Where a plan's entry starts in a metric's spec (after "\n<plan>="), nil when the plan
-- is not configured.
local function plan_at(spec, plan)
  local at = string.find(spec, '\n' .. plan .. '=', 1, true)
  return at and at + #plan + 2
end

-- The metrics of the call, with their org limit resolved: override, else plan, else none.
-- Returns the metrics, the name of an assigned plan that is not configured ('' if none)
-- and the org's earliest reservation deadline (see _reservations.lua).
local function load_metrics()
  local fields = {'plan', DUE}
  for i = 1, NMETRICS do
    fields[i + 2] = 'limit:' .. ARGV[6 + 4 * i]
  end
  local stored = redis.call('HMGET', KEYS[1], unpack(fields))
  local plan, unknown_plan = DEFAULT_PLAN, ''
  if stored[1] and stored[1] ~= DEFAULT_PLAN then
    if plan_at(ARGV[13], stored[1]) then
      plan = stored[1]
    else
      unknown_plan = stored[1]
    end
  end
  local metrics = {}
  for i = 1, NMETRICS do
    local at = 6 + 4 * i
    local spec = ARGV[at + 3]
    -- limit false: unlimited; quota: the most admitted; alert: the first threshold (80 %).
    local m = {
      name = ARGV[at], amount = tonumber(ARGV[at + 1]), personal = ARGV[at + 2] == '1',
      monthly = string.byte(spec) == 49, key = KEYS[4 + 2 * i], other = KEYS[5 + 2 * i],
      limit = false, limit_text = false, quota = MAX, alert = MAX,
      held = 0, held_own = 0,
    }
    -- ttl, thresholds: those of the period the metric's counters belong to (the call's
    -- own when nil, as on every consume).
    if m.monthly and (MODE == 'settle' or MODE == 'cancel') then
      m.ttl, m.thresholds = tonumber(ARGV[7]), KEYS[EXTRA_KEY + 1]
    end
    local override = stored[i + 2]
    if override then
      if override ~= '' and override ~= 'null' then
        local percent = tonumber(string.match(spec, '^%d:(%d+)'))
        m.limit, m.limit_text = tonumber(override), override
        m.quota, m.alert = scaled(override, percent, false), scaled(override, 80, true)
      end
    elseif plan ~= '' then
      local from = plan_at(spec, plan)
      local limit, quota, alert
      if from then
        limit, quota, alert = string.match(spec, '^(%d+):(%d+):(%d+)', from)
      end
      if limit then
        m.limit, m.limit_text = tonumber(limit), limit
        m.quota, m.alert = tonumber(quota), tonumber(alert)
      end
    end
    if not m.monthly then
      m.keep = tonumber(string.match(spec, '^%d:%d+:(%d+)'))
    end
    metrics[i] = m
  end
  return metrics, unknown_plan, stored[2]
end

-- Whether a redis.pcall error says the key holds no integer (an operator's SET typo,
-- another type) rather than that Redis cannot write now (OOM, READONLY, ...).
local function not_a_counter(failure)
  local message = tostring(failure.err)  -- fakeredis hands a Python object over
  return string.find(message, 'WRONGTYPE', 1, true) ~= nil
    or string.find(message, 'not an integer', 1, true) ~= nil
end

-- INCRBY, or nil and the error: the caller takes back what it counted and reports it,
-- so nothing is half applied.
local function incr(key, amount)
  local value = redis.pcall('INCRBY', key, amount)
  if type(value) == 'table' then
    return nil, value
  end
  return value
end

-- A counter's value (0 when absent), or nil and the error when it cannot be read as one.
local function read(key)
  local value = redis.pcall('GET', key)
  if type(value) == 'table' then
    return nil, value
  end
  local number = tonumber(value or '0')
  if not number then
    return nil, {err = 'not an integer'}
  end
  return number
end

-- The error reply for a failed counter: the key named when it holds no integer, else
-- Redis's own error (an outage such as OOM, which the client's policy answers).
local function failed(key, failure)
  if not_a_counter(failure) then
    return redis.error_reply('UGDATA ' .. key .. ' holds no integer counter: nothing was counted')
  end
  return failure
end

-- A monthly counter that adding delta made (its value is delta) expires with its history.
local function expire_if_new(key, value, delta, ttl)
  if value == delta then
    redis.call('EXPIRE', key, ttl or TTL)
  end
end

-- What open reservations hold against each metric's counters: m.held (org) and
-- m.held_own (personal), left at 0 by load_metrics when none is open.
local function load_held(metrics)
  local fields = {}
  for i, m in ipairs(metrics) do
    fields[2 * i - 1], fields[2 * i] = held_field(m.key, KEYS[1]), held_field(m.other, KEYS[1])
  end
  local held = redis.call('HMGET', HELD, unpack(fields))
  for i, m in ipairs(metrics) do
    m.held = tonumber(held[2 * i - 1] or '0')
    if m.personal then
      m.held_own = tonumber(held[2 * i] or '0')
    end
  end
end

-- Record a cumulative value for this period, keeping the newest ``keep`` periods.
local function remember(history, value, keep)
  if redis.call('HSET', history, PERIOD, value) == 1 and redis.call('HLEN', history) > keep then
    local periods = redis.call('HKEYS', history)
    table.sort(periods)
    for i = 1, #periods - keep do
      redis.call('HDEL', history, periods[i])
    end
  end
end

-- Thresholds (80/90/100 % of the limit) newly reached by an org meter, each recorded once
-- per period in m.thresholds; appended to reply as name, threshold, used, limit.
local function reach_thresholds(m, used, reply)
  -- Most calls stay below the first threshold: they need no read of the thresholds hash.
  if not m.limit or m.limit == 0 or used < m.alert then
    return
  end
  local thresholds = m.thresholds or KEYS[3]
  local fired = tonumber(redis.call('HGET', thresholds, m.name) or '0')
  local highest = fired
  for _, threshold in ipairs({80, 90, 100}) do
    if threshold > fired and used >= scaled(m.limit_text, threshold, true) then
      highest = threshold
      local n = #reply
      reply[n + 1], reply[n + 2], reply[n + 3], reply[n + 4] = m.name, threshold, used, m.limit
    end
  end
  if highest > fired then
    redis.call('HSET', thresholds, m.name, highest)
    redis.call('EXPIRE', thresholds, m.ttl or TTL)
  end
end
