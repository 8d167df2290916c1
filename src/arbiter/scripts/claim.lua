-- claim(ids): for each id, decides the owner once, then hands out at most one live lease.
-- One call claims a whole batch (standalone Redis) or one id (Cluster: each id has its own slot);
-- the ids are taken in order, exactly as if each had been claimed by its own call.
-- KEYS[i]  id i's record (a hash; every field of one id lives in this one key)
-- ARGV[1]  lease length, ms      ARGV[2]  a record's TTL: the retention plus ARGV[6], ms
-- ARGV[3]  ambiguous policy: 'l' at least once, 'm' at most once
-- ARGV[4], ARGV[5]  the deployment's two sides (whose marks tell a first sight from a pair)
-- ARGV[6]  the expiry slack, ms (below)
-- ARGV[7 + 3(i-1) ..]  for id i: the side making the claim, the owner that side's switches route
--          the id to, and the lease token of this attempt
-- Returns one {code, attempts, extra, sighting} per id, in order, or {0, error} for an id whose
-- own handling failed:
--   1 PROCEED  extra = 1 when an expired lease was taken over (the earlier call's fate is unknown)
--   2 NOT_MINE extra = owner     3 DONE     4 BUSY extra = ms until the live lease runs out
--   5 DEAD     extra = reason
-- sighting (for parity): 0 this side had observed the id before, 1 this side is the first to
--   observe it, 2 this side is new to it and another side had observed it already.
-- Every record has its owner field `o` (no script writes a record without it, none deletes it),
-- so a record without `o` does not exist yet.
-- Expiry: a record outlives its last claim by at least the retention. Every script that sets the
-- TTL sets the retention plus the slack; a claim within the slack of the first claim (the other
-- side's copy, nearly always) is covered by that and leaves it be; a later claim sets it again.
local lease_ms, ttl_ms, policy = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local sides = {ARGV[4], ARGV[5]}
local slack_ms = tonumber(ARGV[6])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- Numbers go to Redis as strings made once: a Lua number converted per call costs a format each.
local now_s, lease_end_s = string.format('%d', now), string.format('%d', now + lease_ms)

-- The fields a claim by `side` reads: the record's own, `side`'s mark, then the other sides' marks.
local reads = {}
local function fields(side)
  local f = reads[side]
  if not f then
    f = {'o', 's', 't', 'e', 'a', 'f', '@' .. side}
    for _, s in ipairs(sides) do
      if s ~= side then f[#f + 1] = '@' .. s end
    end
    reads[side] = f
  end
  return f
end

local function claim(key, side, routed, token)
  local f = fields(side)
  local rec = redis.call('HMGET', key, unpack(f))
  local owner, state, held, expiry, attempts = rec[1], rec[2], rec[3], tonumber(rec[4]), tonumber(rec[5]) or 0
  -- The first claim's time, when the TTL was set (nil: this claim is the first). A record a late completion wrote has no `f`: every claim sets its expiry.
  local first = tonumber(rec[6]) or 0
  local sighting = 0
  -- Fields to write, gathered so that a first claim is one HSET.
  local set = {}
  if not owner then
    -- First observer: its routing decision is stored and binds every later copy, on every side.
    owner, state, sighting, first = routed, 'p', 1, nil
    if owner == side then
      -- The owner's own first claim: its state and attempts are the lease's, written below.
      set = {'o', owner, 'f', now_s, f[7], '1'}
    else
      set = {'o', owner, 's', 'p', 'a', '0', 'f', now_s, f[7], '1'}
    end
  elseif not rec[7] then
    -- This side's first sight of a known id: had another side seen it?
    sighting = 1
    for i = 8, #f do
      if rec[i] then sighting = 2 break end
    end
    set = {f[7], '1'}
  end

  local answer
  if state == 'd' then
    answer = {3, attempts, '', sighting}
  elseif state == 'x' then
    answer = {5, attempts, redis.call('HGET', key, 'r') or '', sighting}
  elseif owner ~= side then
    answer = {2, attempts, owner, sighting}
  else
    local takeover, proceed = 0, true
    if state == 'i' then
      if held == token then
        -- The same token asking again (a resent batch) gets the same answer.
        answer, proceed = {1, attempts, 0, sighting}, false
      elseif expiry and expiry > now then
        answer, proceed = {4, attempts, expiry - now, sighting}, false
      else
        -- The lease ran out with the call's outcome unknown: the worker crashed or stalled.
        redis.call('HINCRBY', key, 'm', 1)
        if policy == 'm' then
          local reason = 'in doubt: lease of attempt ' .. attempts .. ' expired before its outcome was recorded'
          table.insert(set, 's') table.insert(set, 'x')
          table.insert(set, 'r') table.insert(set, reason)
          redis.call('HDEL', key, 'e')
          answer, proceed = {5, attempts, reason, sighting}, false
        else
          takeover = 1
        end
      end
    end
    if proceed then
      attempts = attempts + 1
      local n = #set
      set[n + 1], set[n + 2], set[n + 3], set[n + 4] = 's', 'i', 't', token
      set[n + 5], set[n + 6], set[n + 7], set[n + 8] = 'e', lease_end_s, 'a', tostring(attempts)
      answer = {1, attempts, takeover, sighting}
    end
  end
  if #set > 0 then redis.call('HSET', key, unpack(set)) end
  if not first or now - first >= slack_ms then
    redis.call('PEXPIRE', key, ttl_ms)
  end
  return answer
end

local out = {}
for i = 1, #KEYS do
  local a = 7 + 3 * (i - 1)
  -- An error (a foreign key of the wrong type under the prefix) is that id's answer alone, not
  -- the batch's: the other ids are answered as if each had had its own call.
  local ok, answer = pcall(claim, KEYS[i], ARGV[a], ARGV[a + 1], ARGV[a + 2])
  out[i] = ok and answer or {0, type(answer) == 'table' and answer.err or tostring(answer)}
end
return out
