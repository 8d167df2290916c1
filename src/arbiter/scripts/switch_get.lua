-- Reads the switches; the whitelist only when they changed since the caller's stamp.
-- KEYS[1] switches hash   KEYS[2] whitelist set
-- ARGV[1] the stamp the caller has, `version:changed_at_ms` ('' for none). The time is part of
--         the stamp so that a Redis that lost its data and counts versions from 1 again is
--         still noticed.
-- Returns {version} when unchanged, else {version, consume, percent, changed_at_ms, ids...}.
local cur = redis.call('HMGET', KEYS[1], 'consume', 'percent', 'version', 'at')
local version = tonumber(cur[3]) or 0
local at = cur[4] or '0'
if (version .. ':' .. at) == ARGV[1] then return {version} end
local out = {version, cur[1] or '0', cur[2] or '0', at}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[2])) do table.insert(out, id) end
return out
