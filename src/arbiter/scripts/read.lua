-- read(id): the record's fields, whichever layout holds them, as the hash layout names them
-- ('o', 's', ... and '@side' per observing side), then its PTTL and the server's time in ms.
-- KEYS[1] the id's record (record.lua)
-- Returns {fields, pttl, now_ms}; fields is empty when there is no record.
local layout, o, s, t, e, a, f, m, v, marks, r = load(KEYS[1])
local out = {}
if layout ~= nil then out = hash_fields(o, s, t, e, a, f, m, v, marks, r) end
return {out, redis.call('PTTL', KEYS[1]), redis_now_ms()}
