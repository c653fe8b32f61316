-- Admin writes to one hash of an org (KEYS[1]).
-- ARGV[1] 'assign': ARGV[2] becomes the plan ('' removes it) and every limit override goes;
-- 'set': HSET ARGV[2] ARGV[3]; 'unset': HDEL ARGV[2].

local op = ARGV[1]
if op == 'assign' then
  for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
    if string.sub(field, 1, 6) == 'limit:' then
      redis.call('HDEL', KEYS[1], field)
    end
  end
  if ARGV[2] == '' then
    return redis.call('HDEL', KEYS[1], 'plan')
  end
  return redis.call('HSET', KEYS[1], 'plan', ARGV[2])
elseif op == 'set' then
  return redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
end
return redis.call('HDEL', KEYS[1], ARGV[2])
