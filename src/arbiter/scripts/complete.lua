-- complete(ids): records the outcome of each call made under a lease.
-- One call records a whole batch (standalone Redis) or one id (Cluster: each id has its own
-- slot); the ids are taken in order, exactly as if each had been recorded by its own call.
-- KEYS[i]  id i's record
-- ARGV[1]  ambiguous policy: 'l' / 'm'     ARGV[2]  max attempts     ARGV[3]  a record's TTL (retention + slack), ms
-- ARGV[4 + 4(i-1) ..]  for id i: the lease token; the outcome ('s' success, 'r' retryable,
--          'f' fatal, 'a' ambiguous, 'n' not called: the lease is handed back unused); the side;
--          the reason (failures)
-- Returns one {code, state, attempts} per id, in order, or {0, error} for an id whose own
-- handling failed:
--   1 RECORDED   the lease was ours; state is the new state
--   2 LATE       the lease was lost, but the call succeeded: recorded as done, overlap counted
--   3 FENCED     the lease was lost and the call failed: nothing changed
--   4 REPEATED   this token's outcome was recorded before: nothing changed
local policy, max_attempts, ttl_ms = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])

local function complete(key, token, outcome, side, why)
  local rec = redis.call('HMGET', key, 's', 't', 'a', 'o')
  local state, held, attempts = rec[1], rec[2], tonumber(rec[3]) or 0

  if held == token and state ~= 'i' then return {4, state, attempts} end
  if state ~= 'i' or held ~= token then
    if outcome ~= 's' then return {3, state or '', attempts} end
    -- The reward happened: record it even though another worker took the lease (or the record
    -- expired), and count the overlap so that it is never invisible.
    if not rec[4] then redis.call('HSET', key, 'o', side, 'a', 1) end
    redis.call('HSET', key, 's', 'd', 't', token)
    redis.call('HDEL', key, 'e', 'r')
    redis.call('HINCRBY', key, 'v', 1)
    redis.call('PEXPIRE', key, ttl_ms)
    return {2, 'd', attempts}
  end

  local function park(reason)
    redis.call('HSET', key, 's', 'x', 'r', reason)
    redis.call('HDEL', key, 'e')
    return {1, 'x', attempts}
  end
  local function retry_or_park(reason)
    if attempts >= max_attempts then
      return park('retries exhausted after ' .. attempts .. ' attempts: ' .. reason)
    end
    redis.call('HSET', key, 's', 'p')
    redis.call('HDEL', key, 'e')
    return {1, 'p', attempts}
  end

  if outcome == 's' then
    -- The lease holder's success: no `r` can be set (only a dead record has one, and its lease
    -- ended), and the lease expiry is left as it is: nothing reads it once the id is done, and
    -- not deleting it saves a command per id.
    redis.call('HSET', key, 's', 'd')
    return {1, 'd', attempts}
  elseif outcome == 'r' then
    return retry_or_park(why)
  elseif outcome == 'f' then
    return park(why)
  elseif outcome == 'n' then
    -- Shutting down before the call started: give the lease back, the attempt never happened.
    redis.call('HSET', key, 's', 'p', 'a', math.max(attempts - 1, 0))
    redis.call('HDEL', key, 'e')
    return {1, 'p', math.max(attempts - 1, 0)}
  elseif outcome == 'a' then
    redis.call('HINCRBY', key, 'm', 1)
    if policy == 'm' then return park('in doubt: ' .. why) end
    return retry_or_park('ambiguous: ' .. why)
  end
  return {0, 'unknown outcome ' .. tostring(outcome)}
end

local out = {}
for i = 1, #KEYS do
  local a = 4 + 4 * (i - 1)
  -- An error (a foreign key of the wrong type under the prefix) is that id's answer alone, not
  -- the batch's: the other ids are answered as if each had had its own call.
  local ok, answer = pcall(complete, KEYS[i], ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3])
  out[i] = ok and answer or {0, type(answer) == 'table' and answer.err or tostring(answer)}
end
return out
