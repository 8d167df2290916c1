-- adopt(ids): a side that observed an id whose owner never did takes the id over, once the owner
-- has had `adopt_after` since the first sighting (DESIGN.md invariant 2). For each id, in order,
-- exactly as if each had its own call (one call per batch on standalone Redis, one per id on
-- Cluster):
--   - the owner has observed the id: its copy decides, nothing changes;
--   - this side already owns it (adopted before): the owner's claim (owner.lua);
--   - the owner has not observed it and `adopt_after` has passed since the first sighting: the
--     owner becomes this side, the record is flagged '^a', and this side claims it as owner.
-- KEYS[i]  id i's record (record.lua)
-- ARGV[1]  lease length, ms      ARGV[2]  a record's TTL (retention + slack), ms
-- ARGV[3]  ambiguous policy: 'l' / 'm'     ARGV[4]  the layout of a new record (unused: no record
--          is created here)     ARGV[5]  adopt_after, ms
-- ARGV[6 + 2(i-1) ..]  for id i: the adopting side, the lease token of this attempt
-- Returns one answer per id (batch.lua): code, flag, attempts, extra:
--   1 PROCEED  flag '1' when adopted by this call; extra '1' when an expired lease was taken over
--   2 OWNER_SEEN  the owner observed the id, or this side never did: nothing to adopt here
--   3 DONE     4 BUSY extra = ms until the live lease runs out
--   5 DEAD     extra = reason; letter written      7 DEAD, letter not written yet
--   8 GONE     no record (expired): nothing can be arbitrated any more
--   9 NOT_YET  extra = ms until the id may be adopted
local lease_ms, ttl_ms, policy, new_layout = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4]
local adopt_after = tonumber(ARGV[5])
local now = redis_now_ms()
local lease_end_s = string.format('%d', now + lease_ms)

local function adopt(key, side, token)
  local layout, o, s, held, e, a, f, m, v, marks, r = load(key)
  if not o then return entry('8', '0', '', '') end
  if s == 'd' then return entry('3', '0', a or '0', '') end
  if s == 'x' then return entry(has_mark(marks, '^l') and '5' or '7', '0', a or '0', r or '') end
  -- Only a side that observed the id sweeps it (its index entry is its own copy's).
  if not has_mark(marks, side) then return entry('2', '0', a or '0', o) end
  local adopted = '0'
  if o ~= side then
    if has_mark(marks, o) then
      return entry('2', '0', a or '0', o)
    end
    -- A call under the owner's name (an operator's replay) is under way: let it finish.
    local expiry = tonumber(e)
    if s == 'i' and expiry and expiry > now then
      return entry('4', '0', a or '0', string.format('%d', expiry - now))
    end
    local since = now - (tonumber(f) or 0)
    if since < adopt_after then
      return entry('9', '0', a or '0', string.format('%d', adopt_after - since))
    end
    o, marks, adopted = side, add_mark(marks, '^a'), '1'
  end
  local code, extra, changed
  code, extra, s, held, e, a, m, marks, r, changed =
    owner_step(s, held, e, a, m, marks, r, token, now, lease_end_s, policy)
  if changed or adopted == '1' then
    save(key, layout, new_layout, ttl_ms, true, o, s, held, e, a, f, m, v, marks, r)
  end
  return entry(code, adopted, a or '0', extra)
end

return each_id(6, 2, adopt)
