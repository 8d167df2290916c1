-- read(id): the record's fields, whichever layout holds them, as the hash layout names them
-- ('o', 's', ... and '@side' per observing side), then its PTTL and the server's time in ms.
-- KEYS[1] the id's record (record.lua)
-- Returns {fields, pttl, now_ms}; fields is empty when there is no record.
local layout, o, s, t, e, a, f, m, v, marks, r = load(KEYS[1])
local out = {}
if layout ~= nil then
  local function put(name, x)
    if x then out[#out + 1], out[#out + 2] = name, x end
  end
  put('o', o) put('s', s) put('t', t) put('e', e) put('a', a) put('f', f) put('m', m) put('v', v) put('r', r)
  for side in string.gmatch(marks, '[^,]+') do put('@' .. side, '1') end
end
local now = redis.call('TIME')
return {out, redis.call('PTTL', KEYS[1]), tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)}
