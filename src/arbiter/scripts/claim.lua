-- claim(id) for one side: decides the owner once, then hands out at most one live lease.
-- KEYS[1]  the id's record (a hash; every field of one id lives in this one key)
-- ARGV[1]  side making the claim          ARGV[2]  owner the claiming side's switches route to
-- ARGV[3]  lease token of this attempt    ARGV[4]  lease length, ms
-- ARGV[5]  retention, ms                  ARGV[6]  ambiguous policy: 'l' at least once, 'm' at most once
-- Returns {code, attempts, extra, sighting}:
--   1 PROCEED  extra = 1 when an expired lease was taken over (the earlier call's fate is unknown)
--   2 NOT_MINE extra = owner     3 DONE     4 BUSY extra = ms until the live lease runs out
--   5 DEAD     extra = reason
-- sighting (for parity): 0 this side had observed the id before, 1 this side is the first to
--   observe it, 2 this side is new to it and another side had observed it already.
local key = KEYS[1]
local side, token = ARGV[1], ARGV[3]
local lease_ms, retention_ms = tonumber(ARGV[4]), tonumber(ARGV[5])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local rec = redis.call('HMGET', key, 'o', 's', 't', 'e', 'a')
local owner, state, held, expiry, attempts = rec[1], rec[2], rec[3], tonumber(rec[4]), tonumber(rec[5]) or 0
if not owner then
  -- First observer: its routing decision is stored and binds every later copy, on every side.
  owner, state = ARGV[2], 'p'
  redis.call('HSET', key, 'o', owner, 's', 'p', 'a', 0, 'f', now)
end
local sighting = 0
if redis.call('HSETNX', key, '@' .. side, 1) == 1 then
  sighting = 1
  -- Only on a side's first sight of the id: a look at the other sides' marks (a handful of fields).
  for _, f in ipairs(redis.call('HKEYS', key)) do
    if string.byte(f, 1) == 64 and f ~= '@' .. side then sighting = 2 break end
  end
end
redis.call('PEXPIRE', key, retention_ms)

if state == 'd' then return {3, attempts, '', sighting} end
if state == 'x' then return {5, attempts, redis.call('HGET', key, 'r') or '', sighting} end
if owner ~= side then return {2, attempts, owner, sighting} end

local takeover = 0
if state == 'i' then
  -- The same token asking again (a resent batch) gets the same answer.
  if held == token then return {1, attempts, 0, sighting} end
  if expiry and expiry > now then return {4, attempts, expiry - now, sighting} end
  -- The lease ran out with the call's outcome unknown: the worker crashed or stalled.
  redis.call('HINCRBY', key, 'm', 1)
  if ARGV[6] == 'm' then
    local reason = 'in doubt: lease of attempt ' .. attempts .. ' expired before its outcome was recorded'
    redis.call('HSET', key, 's', 'x', 'r', reason)
    redis.call('HDEL', key, 'e')
    return {5, attempts, reason, sighting}
  end
  takeover = 1
end
attempts = attempts + 1
redis.call('HSET', key, 's', 'i', 't', token, 'e', now + lease_ms, 'a', attempts)
return {1, attempts, takeover, sighting}
