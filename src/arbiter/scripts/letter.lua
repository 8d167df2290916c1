-- letter(id): notes that the dead letter of the id's current dead state is written, so that later
-- claims answer DEAD with '5' (letter written) instead of '7' (the caller writes it).
-- KEYS[1] the id's record (record.lua)
-- Returns 1 when noted (or noted before), 0 when the id is not dead (released, or never was).
local layout, o, s, t, e, a, f, m, v, marks, r = load(KEYS[1])
if s ~= 'x' then return 0 end
if has_mark(marks, '^l') then return 1 end
save(KEYS[1], layout, nil, 0, false, o, s, t, e, a, f, m, v, add_mark(marks, '^l'), r)
return 1
