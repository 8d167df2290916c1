-- release(id): an operator hands a dead (or in-doubt) id back to pending, keeping its owner.
-- KEYS[1] the id's record (record.lua); ARGV[1] a record's TTL (retention + slack), ms
-- Returns {1, previous reason} when released, {0, state} when the id is not dead.
local layout, o, s, t, e, a, f, m, v, marks, r = load(KEYS[1])
if s ~= 'x' then return {0, s or ''} end
save(KEYS[1], layout, nil, ARGV[1], true, o, 'p', t, nil, '0', f, m, v, drop_mark(marks, '^l'), nil)
return {1, r or ''}
