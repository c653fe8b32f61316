-- Every member's personal counts of the current month and their budgets, in one call
-- (after sweeping expired reservations): the team's breakdown reads two hashes whatever
-- its size. KEYS[1] org hash, KEYS[2] budgets hash, KEYS[3] open reservations, KEYS[4]
-- held estimates, KEYS[5] personal counts of the current month; ARGV[1] now (ms, by the
-- guard's clock).
-- Reply: {HGETALL personal counts, HGETALL budgets, HGETALL held (or {} when no
--         reservation is open)}.

local held = {}
if sweep(KEYS[3], KEYS[4], ARGV[1], redis.call('HGET', KEYS[1], DUE)) then
  held = redis.call('HGETALL', KEYS[4])
end
return {redis.call('HGETALL', KEYS[5]), redis.call('HGETALL', KEYS[2]), held}
