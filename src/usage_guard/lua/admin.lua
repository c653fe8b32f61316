-- Admin writes to one hash of an org (KEYS[2]: the org's own hash KEYS[1], or its
-- budgets), after sweeping its expired reservations (KEYS[3] open reservations, KEYS[4]
-- held estimates, ARGV[1] now in ms).
-- ARGV[2] 'assign': ARGV[3] becomes the plan ('' removes it) and every limit override goes;
-- 'set': HSET ARGV[3] ARGV[4]; 'unset': HDEL ARGV[3].

sweep(KEYS[3], KEYS[4], ARGV[1], redis.call('HGET', KEYS[1], DUE))
local target, op = KEYS[2], ARGV[2]
if op == 'assign' then
  for _, field in ipairs(redis.call('HKEYS', target)) do
    if string.sub(field, 1, 6) == 'limit:' then
      redis.call('HDEL', target, field)
    end
  end
  if ARGV[3] == '' then
    return redis.call('HDEL', target, 'plan')
  end
  return redis.call('HSET', target, 'plan', ARGV[3])
elseif op == 'set' then
  return redis.call('HSET', target, ARGV[3], ARGV[4])
end
return redis.call('HDEL', target, ARGV[3])
