-- release(id): an operator hands a dead (or in-doubt) id back to pending, keeping its owner.
-- KEYS[1] the id's record; ARGV[1] a record's TTL (retention + slack), ms
-- Returns {1, previous reason} when released, {0, state} when the id is not dead.
local rec = redis.call('HMGET', KEYS[1], 's', 'r')
if rec[1] ~= 'x' then return {0, rec[1] or ''} end
redis.call('HSET', KEYS[1], 's', 'p', 'a', 0)
redis.call('HDEL', KEYS[1], 'r', 'e')
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]))
return {1, rec[2] or ''}
