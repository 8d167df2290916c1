-- claim(ids): for each id, decides the owner once, then hands out at most one live lease.
-- One call claims a whole batch (standalone Redis) or one id (Cluster: each id has its own slot);
-- the ids are taken in order, exactly as if each had been claimed by its own call.
-- KEYS[i]  id i's record (every field of one id lives in this one key; record.lua)
-- ARGV[1]  lease length, ms      ARGV[2]  a record's TTL: the retention plus ARGV[5], ms
-- ARGV[3]  ambiguous policy: 'l' at least once, 'm' at most once
-- ARGV[4]  the layout of a new record: 'p' packed, 'h' hash
-- ARGV[5]  the expiry slack, ms (below)
-- ARGV[6 + 3(i-1) ..]  for id i: the side making the claim, the owner that side's switches route
--          the id to, and the lease token of this attempt
-- Returns one answer per id, in order (batch.lua): code, flag = sighting, attempts, extra.
--   1 PROCEED  extra 1 when an expired lease was taken over (the earlier call's outcome is
--              unknown), else 0
--   2 NOT_MINE extra = owner, who has observed the id (its copy does the work)
--   6 NOT_MINE extra = owner, who has not observed the id yet: this side keeps its copy's
--              position so that it can adopt the id if the owner's copy never comes (adopt.lua)
--   3 DONE     4 BUSY extra = ms until the live lease runs out
--   5 DEAD     extra = reason; its dead letter is written
--   7 DEAD     extra = reason; its dead letter is not written yet: the caller writes it
--   0 this id's own error, extra = the message
-- sighting (for parity): 0 this side had observed the id before, 1 this side is the first to
--   observe it, 2 this side is new to it and another side had observed it already.
-- Every record has its owner (no script writes a record without it, none deletes it), so a
-- record without one does not exist yet.
-- Expiry: a record outlives its last claim by at least the retention. Every script that sets the
-- TTL sets the retention plus the slack; a claim within the slack of the first claim (the other
-- side's copy, nearly always) is covered by that and leaves it be; a later claim sets it again.
local lease_ms, ttl_ms, policy, new_layout = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4]
local slack_ms = tonumber(ARGV[5])
local now = redis_now_ms()
-- Numbers go to Redis as strings made once: a Lua number converted per call costs a format each.
local now_s, lease_end_s = string.format('%d', now), string.format('%d', now + lease_ms)

-- ',side,': how a side appears in a record's marks.
local needles = {}

local function claim(key, side, routed, token)
  local layout, o, s, held, e, a, f, m, v, marks, r = load(key)
  -- The first claim's time, when the TTL was set (nil: this claim is the first). A record a
  -- late completion wrote has none: every claim sets its expiry.
  local first = tonumber(f) or 0
  local needle = needles[side]
  if not needle then
    needle = ',' .. side .. ','
    needles[side] = needle
  end
  local sighting, dirty = '0', false
  if not o then
    -- First observer: its routing decision is stored and binds every later copy, on every side.
    o, s, a, f, marks = routed, 'p', '0', now_s, needle
    sighting, first, dirty = '1', nil, true
  elseif not string.find(marks, needle, 1, true) then
    -- This side's first sight of a known id: had another side seen it?
    sighting = any_side(marks) and '2' or '1'
    marks = marks == '' and needle or marks .. side .. ','
    dirty = true
  end

  -- A record's attempts are stored as text: answered as they are, not formatted again.
  local answer
  if s == 'd' then
    answer = entry('3', sighting, a or '0', '')
  elseif s == 'x' then
    answer = entry(has_mark(marks, '^l') and '5' or '7', sighting, a or '0', r or '')
  elseif o ~= side then
    answer = entry(has_mark(marks, o) and '2' or '6', sighting, a or '0', o)
  else
    local code, extra, changed
    code, extra, s, held, e, a, m, marks, r, changed =
      owner_step(s, held, e, a, m, marks, r, token, now, lease_end_s, policy)
    dirty = dirty or changed
    answer = entry(code, sighting, a or '0', extra)
  end
  local expire = not first or now - first >= slack_ms
  if dirty then
    save(key, layout, new_layout, ttl_ms, expire, o, s, held, e, a, f, m, v, marks, r)
  elseif expire then
    redis.call('PEXPIRE', key, ttl_ms)
  end
  return answer
end

return each_id(6, 3, claim)
