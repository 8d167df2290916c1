-- Reads the switches; the whitelist only when the version differs from the one the caller has.
-- KEYS[1] switches hash   KEYS[2] whitelist set   ARGV[1] version the caller has (-1: none)
-- Returns {version} when unchanged, else {version, consume, percent, whitelist ids...}.
local cur = redis.call('HMGET', KEYS[1], 'consume', 'percent', 'version')
local version = tonumber(cur[3]) or 0
if tostring(version) == ARGV[1] then return {version} end
local out = {version, cur[1] or '0', cur[2] or '0'}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[2])) do table.insert(out, id) end
return out
