-- renew(id): extends the lease held by this token, from now. A lease that ran out but that no
-- other claim took over is still this token's (the id is in flight with it), so it is renewed too.
-- KEYS[1] the id's record; ARGV[1] lease token; ARGV[2] lease length, ms
-- Returns 1 when renewed, 0 when the lease is no longer this token's.
local rec = redis.call('HMGET', KEYS[1], 's', 't')
if rec[1] ~= 'i' or rec[2] ~= ARGV[1] then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], 'e', now + tonumber(ARGV[2]))
return 1
