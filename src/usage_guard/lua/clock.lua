-- The server's clock (TIME), read through a script on KEYS[1]: on a Redis Cluster it
-- then comes from the node that owns that key's slot, the one its next call runs on.
return redis.call('TIME')
