-- consume / idempotent / check / reserve (MODE): check every metric, then count all or none.
-- FLAGS 'i': KEYS[EXTRA_KEY] remembers an admitted consumption for 24 h (idempotency);
-- FLAGS 'r': KEYS[EXTRA_KEY] records the reservation's estimates.
-- Reply: {admitted (1/0), metric, scope, used, limit (-1: none), quota (-1: none),
--         assigned plan that is not configured ('' if none), then name, threshold,
--         used, limit for each threshold reached}; an idempotent replay is {2, stored}.

local function fits(used, amount, quota)
  return used <= quota and amount <= quota - used
end

local extra = KEYS[EXTRA_KEY]
if FLAGS == 'i' then
  local stored = redis.call('GET', extra)
  if stored then
    return {2, stored}
  end
end

local metrics, unknown_plan = load_metrics()
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

-- The personal budget is checked before the org limit: it names the scope of a denial.
for i, m in ipairs(metrics) do
  if m.personal then
    local counters = redis.call('MGET', m.key, m.other)
    m.used, m.own = tonumber(counters[1] or '0'), tonumber(counters[2] or '0')
    m.budget = budgets[i] and tonumber(budgets[i])
    if m.budget and not fits(m.own, m.amount, m.budget) then
      return {0, m.name, 'personal', m.own, m.budget, m.budget, unknown_plan}
    end
  else
    m.used = tonumber(redis.call('GET', m.key) or '0')
  end
  if not fits(m.used, m.amount, m.quota) then
    return {0, m.name, 'organization', m.used, m.limit or -1, m.limit and m.quota or -1,
            unknown_plan}
  end
end

if MODE ~= 'check' then
  for _, m in ipairs(metrics) do
    if m.amount > 0 then
      m.used = add(m.key, m.amount, m.monthly)
      if m.personal then
        m.own = add(m.other, m.amount, true)
      end
      if not m.monthly then
        remember(m.other, m.used, m.keep)
      end
    end
  end
end

-- The decision describes the first metric's binding budget: the personal one if it leaves less.
local first = metrics[1]
local reply
if first.budget and (not first.limit or first.budget - first.own < first.quota - first.used) then
  reply = {1, first.name, 'personal', first.own, first.budget, first.budget, unknown_plan}
else
  reply = {1, first.name, 'organization', first.used, first.limit or -1,
           first.limit and first.quota or -1, unknown_plan}
end
if MODE == 'check' then
  return reply
end

if FLAGS == 'i' then
  redis.call('SET', extra, string.format('%s\t%s\t%d\t%d\t%d\t%s', first.name, reply[3],
    reply[4], reply[5], reply[6], PERIOD), 'EX', 86400)
elseif FLAGS == 'r' then
  local fields = {'period', PERIOD, 'user', USER}
  for _, m in ipairs(metrics) do
    fields[#fields + 1] = m.name
    fields[#fields + 1] = m.amount
  end
  redis.call('HSET', extra, unpack(fields))
  redis.call('EXPIRE', extra, TTL)
end
for _, m in ipairs(metrics) do
  if m.amount > 0 then
    reach_thresholds(m, m.used, reply)
  end
end
return reply
