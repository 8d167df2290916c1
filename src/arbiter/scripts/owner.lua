-- The owner's claim of an id it owns (claim.lua, adopt.lua; this file comes after record.lua and
-- batch.lua): at most one live lease. Takes the record's fields it may change and the lease token
-- of this attempt; returns the answer's code and extra, the fields afterwards, and whether they
-- changed.
--   '1' PROCEED, extra '1' when an expired lease was taken over (the earlier call's outcome is
--       unknown), else '0'
--   '4' BUSY, extra = ms until the live lease runs out
--   '7' DEAD (in doubt under at most once), extra = the reason; its letter is not written yet
local function owner_step(s, held, e, a, m, marks, r, token, now, lease_end_s, policy)
  local takeover = '0'
  if s == 'i' then
    local expiry = tonumber(e)
    if held == token then
      -- The same token asking again (a resent batch) gets the same answer.
      return '1', '0', s, held, e, a, m, marks, r, false
    end
    if expiry and expiry > now then
      return '4', tostring(expiry - now), s, held, e, a, m, marks, r, false
    end
    -- The lease ran out with the call's outcome unknown: the worker crashed or stalled.
    m = tostring((tonumber(m) or 0) + 1)
    if policy == 'm' then
      r = 'in doubt: lease of attempt ' .. (a or '0') .. ' expired before its outcome was recorded'
      -- The stale worker's token goes: should its call have succeeded after all, its completion
      -- is then LATE (recorded as done, overlap counted), never REPEATED (the success lost).
      return '7', r, 'x', nil, nil, a, m, drop_mark(marks, '^l'), r, true
    end
    takeover = '1'
  end
  a = tostring((tonumber(a) or 0) + 1)
  return '1', takeover, 'i', token, lease_end_s, a, m, marks, r, true
end
