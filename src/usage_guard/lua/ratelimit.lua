-- Short-window rate limits: a moving window per org, metric and window. Every limit the
-- org's plan declares for the request's metrics is checked, then all are counted or none.
-- KEYS[1] org hash, then one list per limit: the times (ms) of the requests counted in
--   its window, newest first.
-- ARGV[1] the default plan ('' for none), ARGV[2] "\n<plan>\n..." every configured plan,
--   then three per limit: metric, window (ms), "\n<plan>=<amount>\n..." for every plan
--   declaring it.
-- Reply: {} when admitted, else {metric, amount, window (ms), ms until one more fits} of
--   the first limit exceeded.
-- The time is Redis's own, so app servers whose clocks disagree share one window.

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local plan = redis.call('HGET', KEYS[1], 'plan')
if not plan or not string.find(ARGV[2], '\n' .. plan .. '\n', 1, true) then
  plan = ARGV[1]  -- none assigned, or one that is not configured: the default
end
local counted = {}
for i = 2, #KEYS do
  local at = 3 * i - 3
  local metric, window, amounts = ARGV[at], tonumber(ARGV[at + 1]), ARGV[at + 2]
  local from = string.find(amounts, '\n' .. plan .. '=', 1, true)
  if from then
    local amount = tonumber(string.match(amounts, '^(%d+)', from + #plan + 2))
    local oldest = amount > 0 and redis.call('LINDEX', KEYS[i], amount - 1)
    if amount == 0 then
      return {metric, amount, window, window}
    elseif oldest and tonumber(oldest) > now - window then
      return {metric, amount, window, tonumber(oldest) + window - now}
    end
    counted[#counted + 1] = {KEYS[i], amount, window}
  end
end
for _, limit in ipairs(counted) do
  redis.call('LPUSH', limit[1], now)
  redis.call('LTRIM', limit[1], 0, limit[2] - 1)
  redis.call('PEXPIRE', limit[1], limit[3])
end
return {}
