-- renew(id): extends the lease held by this token, from now. A lease that ran out but that no
-- other claim took over is still this token's (the id is in flight with it), so it is renewed too.
-- KEYS[1] the id's record (record.lua); ARGV[1] lease token; ARGV[2] lease length, ms
-- Returns 1 when renewed, 0 when the lease is no longer this token's.
local layout, o, s, t, e, a, f, m, v, marks, r = load(KEYS[1])
if s ~= 'i' or t ~= ARGV[1] then return 0 end
local lease_end = string.format('%d', redis_now_ms() + tonumber(ARGV[2]))
save(KEYS[1], layout, nil, 0, false, o, s, t, lease_end, a, f, m, v, marks, r)
return 1
