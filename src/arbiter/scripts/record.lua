-- An id's record, read and written by every script below (this file is put in front of each).
--
-- Two layouts hold the same fields (docs/arbiter.md, "The record"):
--   packed  one string '1|o|s|t|e|a|f|m|v|marks|r': the layout version, then the owner, state,
--           lease token, lease end (ms), attempts, first claim (ms), ambiguous count, overlap
--           count, the sides that observed the id (',a,b,'), and the reason, which is last
--           because it is free text; an empty field is an absent one. One GET and one SET per
--           step, the TTL set by the SET itself.
--   hash    one hash field per field ('o', 's', ... and '@side' per observing side): the layout
--           of versions before the packed one, still written when `arbiter.record_layout` says
--           so (while instances that only read hashes are still running).
-- A record keeps the layout it was created in; a new record gets the configured one.
--
-- The marks also carry flags, which start with '^' (a side name never does): '^a' the id was
-- adopted (its owner changed because the routed owner never observed it), '^l' the dead letter
-- of the id's current dead state is written. Versions that know no flags read them as sides that
-- never claim, and keep them as they are.

local PACKED = '^1|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|(.*)$'

-- Returns the layout (true packed, false hash, nil no record) and the fields
-- o, s, t, e, a, f, m, v, marks, r (strings or nil; marks '' when no side observed it).
local function load(key)
  local raw = redis.pcall('GET', key)
  if not raw then return nil end
  if type(raw) == 'string' then
    local o, s, t, e, a, f, m, v, marks, r = string.match(raw, PACKED)
    if not o then error('the value at ' .. key .. ' is not a record') end
    -- Inline rather than through a function: this runs for every id of every batch.
    return true, o ~= '' and o or nil, s ~= '' and s or nil, t ~= '' and t or nil,
      e ~= '' and e or nil, a ~= '' and a or nil, f ~= '' and f or nil, m ~= '' and m or nil,
      v ~= '' and v or nil, marks, r ~= '' and r or nil
  end
  -- Not a string: a hash record (anything else fails its HGETALL with WRONGTYPE).
  local h = redis.call('HGETALL', key)
  if #h == 0 then return nil end
  local rec, marks = {}, ''
  for i = 1, #h, 2 do
    local k = h[i]
    if string.byte(k) == 64 then -- '@side'
      marks = (marks == '' and ',' or marks) .. string.sub(k, 2) .. ','
    else
      rec[k] = h[i + 1]
    end
  end
  return false, rec.o, rec.s, rec.t, rec.e, rec.a, rec.f, rec.m, rec.v, marks, rec.r
end

-- Whether `marks` holds `mark` (a side or a flag).
local function has_mark(marks, mark)
  return string.find(marks, ',' .. mark .. ',', 1, true) ~= nil
end

-- `marks` with `mark` added (once).
local function add_mark(marks, mark)
  if has_mark(marks, mark) then return marks end
  return (marks == '' and ',' or marks) .. mark .. ','
end

-- `marks` without `mark`.
local function drop_mark(marks, mark)
  local from, to = string.find(marks, ',' .. mark .. ',', 1, true)
  if not from then return marks end
  local out = string.sub(marks, 1, from) .. string.sub(marks, to + 1)
  return out == ',' and '' or out
end

-- Whether any side (not only flags) has observed the id.
local function any_side(marks)
  return string.find(marks, ',[^^,]') ~= nil
end

-- Redis's own clock, ms since the epoch (lease ends are compared with it, never a daemon's).
local function redis_now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The fields in the hash layout: {name, value, ...} of the present ones (`@side` = '1' per
-- observing side), and the names of the absent ones.
local function hash_fields(o, s, t, e, a, f, m, v, marks, r)
  local set, del = {'o', o}, {}
  local function put(name, x)
    if x then
      set[#set + 1], set[#set + 2] = name, x
    else
      del[#del + 1] = name
    end
  end
  put('s', s) put('t', t) put('e', e) put('a', a) put('f', f) put('m', m) put('v', v) put('r', r)
  for side in string.gmatch(marks, '[^,]+') do
    set[#set + 1], set[#set + 2] = '@' .. side, '1'
  end
  -- Sides never leave the marks, flags do.
  for _, flag in ipairs({'^a', '^l'}) do
    if not has_mark(marks, flag) then del[#del + 1] = '@' .. flag end
  end
  return set, del
end

-- Writes a record in `layout` (true packed, false hash, nil: the configured `new_layout`, 'p' or
-- 'h'). `ttl_ms` is set as its TTL when `expire`; otherwise the TTL is left as it is.
local function save(key, layout, new_layout, ttl_ms, expire, o, s, t, e, a, f, m, v, marks, r)
  if layout == nil then layout = new_layout == 'p' end
  if layout then
    local raw = '1|' .. o .. '|' .. (s or '') .. '|' .. (t or '') .. '|' .. (e or '') .. '|' ..
      (a or '') .. '|' .. (f or '') .. '|' .. (m or '') .. '|' .. (v or '') .. '|' .. marks ..
      '|' .. (r or '')
    if expire then
      redis.call('SET', key, raw, 'PX', ttl_ms)
    else
      redis.call('SET', key, raw, 'KEEPTTL')
    end
    return
  end
  local set, del = hash_fields(o, s, t, e, a, f, m, v, marks, r)
  redis.call('HSET', key, unpack(set))
  if #del > 0 then redis.call('HDEL', key, unpack(del)) end
  if expire then redis.call('PEXPIRE', key, ttl_ms) end
end
