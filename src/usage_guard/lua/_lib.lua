-- Shared by consume.lua and adjust.lua (prepended when the scripts are loaded).
--
-- Common arguments:
--   KEYS[1] org hash, KEYS[2] budgets hash, KEYS[3] thresholds hash of the period,
--   then two keys per metric (monthly: org counter, personal counter or the
--   counter again; cumulative: gauge, history hash), then the script's extras.
--   ARGV[1] period (YYYY-MM), ARGV[2] TTL of that period's keys (s),
--   ARGV[3] months of cumulative history kept, ARGV[4] number of plans N,
--   ARGV[5] index of the default plan (0: none), ARGV[6..5+N] plan names,
--   ARGV[6+N] mode, ARGV[7+N] user id ('' for none), ARGV[8+N] flags,
--   then one block of 5+N per metric: name, amount, personal (1/0: counted for USER),
--   monthly (1/0), percent of the limit admitted, the N plans' limits ('' = none).
-- Lua numbers are doubles: every value stays within 0..2^53-1 (MAX), and
-- limits are scaled from their decimal strings so the arithmetic stays exact.

local MAX = 9007199254740991
local PERIOD = ARGV[1]
local TTL = tonumber(ARGV[2])
local KEEP = tonumber(ARGV[3])
local NPLANS = tonumber(ARGV[4])
local DEFAULT_PLAN = tonumber(ARGV[5])
local MODE = ARGV[6 + NPLANS]
local USER = ARGV[7 + NPLANS]
local FLAGS = ARGV[8 + NPLANS]
local FIRST_BLOCK = 9 + NPLANS
local BLOCK = 5 + NPLANS
local NMETRICS = math.floor((#ARGV - FIRST_BLOCK + 1) / BLOCK)
local EXTRA_KEY = 4 + 2 * NMETRICS

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
-- Returns the metrics and the name of an assigned plan that is not configured ('' if none).
local function load_metrics()
  local fields = {'plan'}
  for i = 1, NMETRICS do
    fields[i + 1] = 'limit:' .. ARGV[FIRST_BLOCK + (i - 1) * BLOCK]
  end
  local stored = redis.call('HMGET', KEYS[1], unpack(fields))
  local plan, unknown_plan = DEFAULT_PLAN, ''
  if stored[1] then
    plan = -1
    for p = 1, NPLANS do
      if ARGV[5 + p] == stored[1] then
        plan = p
      end
    end
    if plan == -1 then
      plan, unknown_plan = DEFAULT_PLAN, stored[1]
    end
  end
  local metrics = {}
  for i = 1, NMETRICS do
    local at = FIRST_BLOCK + (i - 1) * BLOCK
    local limit = stored[i + 1]
    if not limit and plan > 0 then
      limit = ARGV[at + 4 + plan]
    end
    if limit == '' or limit == 'null' then
      limit = false
    end
    local m = {
      name = ARGV[at], amount = tonumber(ARGV[at + 1]), personal = ARGV[at + 2] == '1',
      monthly = ARGV[at + 3] == '1', key = KEYS[2 + 2 * i], other = KEYS[3 + 2 * i],
      limit = false, limit_text = limit, quota = MAX,
    }
    if limit then
      m.limit = tonumber(limit)
      m.quota = scaled(limit, tonumber(ARGV[at + 4]), false)
    end
    metrics[i] = m
  end
  return metrics, unknown_plan
end

-- Add delta to a counter, never below 0; a new monthly key expires with its history window.
local function add(key, delta, expires)
  local value = redis.call('INCRBY', key, delta)
  if expires and value == delta then
    redis.call('EXPIRE', key, TTL)
  end
  if value < 0 then
    redis.call('INCRBY', key, -value)
    value = 0
  end
  return value
end

-- Record a cumulative value for this period, keeping the newest KEEP periods.
local function remember(history, value)
  if redis.call('HSET', history, PERIOD, value) == 1 and redis.call('HLEN', history) > KEEP then
    local periods = redis.call('HKEYS', history)
    table.sort(periods)
    for i = 1, #periods - KEEP do
      redis.call('HDEL', history, periods[i])
    end
  end
end

-- Thresholds (80/90/100 % of the limit) newly reached by an org meter, each recorded once
-- per period in KEYS[3]; appended to reply as name, threshold, used, limit.
local function reach_thresholds(m, used, reply)
  -- Most calls stay below the first threshold: they need no read of the thresholds hash.
  if not m.limit or m.limit == 0 or used < scaled(m.limit_text, 80, true) then
    return
  end
  local fired = tonumber(redis.call('HGET', KEYS[3], m.name) or '0')
  local highest = fired
  for _, threshold in ipairs({80, 90, 100}) do
    if threshold > fired and used >= scaled(m.limit_text, threshold, true) then
      highest = threshold
      local n = #reply
      reply[n + 1], reply[n + 2], reply[n + 3], reply[n + 4] = m.name, threshold, used, m.limit
    end
  end
  if highest > fired then
    redis.call('HSET', KEYS[3], m.name, highest)
    redis.call('EXPIRE', KEYS[3], TTL)
  end
end
