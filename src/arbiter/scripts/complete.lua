-- complete(ids): records the outcome of each call made under a lease.
-- One call records a whole batch (standalone Redis) or one id (Cluster: each id has its own
-- slot); the ids are taken in order, exactly as if each had been recorded by its own call.
-- KEYS[i]  id i's record (record.lua)
-- ARGV[1]  ambiguous policy: 'l' / 'm'     ARGV[2]  max attempts     ARGV[3]  a record's TTL (retention + slack), ms
-- ARGV[4]  the layout of a new record: 'p' packed, 'h' hash (a late success on an expired record)
-- ARGV[5 + 4(i-1) ..]  for id i: the lease token; the outcome ('s' success, 'r' retryable,
--          'f' fatal, 'a' ambiguous, 'n' not called: the lease is handed back unused); the side;
--          the reason (failures)
-- Returns one answer per id, in order (batch.lua): code, flag = the state afterwards ('-' for
-- none), the attempts, no extra:
--   1 RECORDED   the lease was ours; state is the new state
--   2 LATE       the lease was lost, but the call succeeded: recorded as done, overlap counted
--   3 FENCED     the lease was lost and the call failed: nothing changed
--   4 REPEATED   this token's outcome was recorded before: nothing changed
--   0            this id's own error, extra = the message
local policy, max_attempts, ttl_ms, new_layout = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]

local function complete(key, token, outcome, side, why)
  local layout, o, s, held, e, a, f, m, v, marks, r = load(key)
  local attempts = tonumber(a) or 0

  if held == token and s ~= 'i' then return entry('4', s or '-', a or '', '') end
  local expire, answer = false, nil
  if s ~= 'i' or held ~= token then
    if outcome ~= 's' then return entry('3', s or '-', a or '', '') end
    -- The reward happened: record it even though another worker took the lease (or the record
    -- expired), and count the overlap so that it is never invisible.
    if not o then o, a, marks = side, '1', '' end
    s, held, e, r = 'd', token, nil, nil
    v = tostring((tonumber(v) or 0) + 1)
    expire, answer = true, entry('2', 'd', a or '', '')
  elseif outcome == 's' then
    -- The lease holder's success: no reason can be set (only a dead record has one, and its
    -- lease ended), and the lease end is left as it is: nothing reads it once the id is done.
    s, answer = 'd', entry('1', 'd', a or '', '')
  elseif outcome == 'n' then
    -- Shutting down before the call started: give the lease back, the attempt never happened.
    attempts = math.max(attempts - 1, 0)
    s, e, a = 'p', nil, tostring(attempts)
    answer = entry('1', 'p', a, '')
  else
    -- A failure: parked for good (`park`), or pending for the owner to call again unless its
    -- attempts are used up (`retry`).
    local park, retry
    if outcome == 'f' then
      park = why
    elseif outcome == 'r' then
      retry = why
    elseif outcome == 'a' then
      m = tostring((tonumber(m) or 0) + 1)
      if policy == 'm' then park = 'in doubt: ' .. why else retry = 'ambiguous: ' .. why end
    else
      error({err = 'unknown outcome ' .. tostring(outcome)})
    end
    if retry and attempts >= max_attempts then
      park = 'retries exhausted after ' .. attempts .. ' attempts: ' .. retry
    end
    if park then
      -- A new dead state: its letter is still to be written (the caller writes it).
      s, r, e, marks = 'x', park, nil, drop_mark(marks, '^l')
    else
      s, e = 'p', nil
    end
    answer = entry('1', s, a or '', '')
  end
  save(key, layout, new_layout, ttl_ms, expire, o, s, held, e, a, f, m, v, marks, r)
  return answer
end

return each_id(5, 4, complete)
