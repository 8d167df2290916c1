-- complete(id): records the outcome of the call made under a lease.
-- KEYS[1]  the id's record
-- ARGV[1]  lease token          ARGV[2]  outcome: 's' success, 'r' retryable, 'f' fatal, 'a' ambiguous,
--                                          'n' not called (the lease is handed back unused)
-- ARGV[3]  side                 ARGV[4]  ambiguous policy: 'l' / 'm'
-- ARGV[5]  max attempts         ARGV[6]  reason (failures)     ARGV[7]  retention, ms
-- Returns {code, state, attempts}:
--   1 RECORDED   the lease was ours; state is the new state
--   2 LATE       the lease was lost, but the call succeeded: recorded as done, overlap counted
--   3 FENCED     the lease was lost and the call failed: nothing changed
--   4 REPEATED   this token's outcome was recorded before: nothing changed
local key = KEYS[1]
local token, outcome = ARGV[1], ARGV[2]
local rec = redis.call('HMGET', key, 's', 't', 'a', 'o')
local state, held, attempts = rec[1], rec[2], tonumber(rec[3]) or 0

if held == token and state ~= 'i' then return {4, state, attempts} end
if state ~= 'i' or held ~= token then
  if outcome ~= 's' then return {3, state or '', attempts} end
  -- The reward happened: record it even though another worker took the lease (or the record
  -- expired), and count the overlap so that it is never invisible.
  if not rec[4] then redis.call('HSET', key, 'o', ARGV[3], 'a', 1) end
  redis.call('HSET', key, 's', 'd', 't', token)
  redis.call('HDEL', key, 'e', 'r')
  redis.call('HINCRBY', key, 'v', 1)
  redis.call('PEXPIRE', key, tonumber(ARGV[7]))
  return {2, 'd', attempts}
end

local function park(reason)
  redis.call('HSET', key, 's', 'x', 'r', reason)
  redis.call('HDEL', key, 'e')
  return {1, 'x', attempts}
end
local function retry_or_park(reason)
  if attempts >= tonumber(ARGV[5]) then
    return park('retries exhausted after ' .. attempts .. ' attempts: ' .. reason)
  end
  redis.call('HSET', key, 's', 'p')
  redis.call('HDEL', key, 'e')
  return {1, 'p', attempts}
end

if outcome == 's' then
  redis.call('HSET', key, 's', 'd')
  redis.call('HDEL', key, 'e', 'r')
  return {1, 'd', attempts}
elseif outcome == 'r' then
  return retry_or_park(ARGV[6])
elseif outcome == 'f' then
  return park(ARGV[6])
elseif outcome == 'n' then
  -- Shutting down before the call started: give the lease back, the attempt never happened.
  redis.call('HSET', key, 's', 'p', 'a', math.max(attempts - 1, 0))
  redis.call('HDEL', key, 'e')
  return {1, 'p', math.max(attempts - 1, 0)}
elseif outcome == 'a' then
  redis.call('HINCRBY', key, 'm', 1)
  if ARGV[4] == 'm' then return park('in doubt: ' .. ARGV[6]) end
  return retry_or_park('ambiguous: ' .. ARGV[6])
end
return redis.error_reply('unknown outcome ' .. tostring(outcome))
