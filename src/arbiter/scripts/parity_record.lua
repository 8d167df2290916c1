-- parity_record: what one claim batch of one side learned about first sights, in one call.
-- All keys share the `{parity}` hash tag (one Cluster slot).
-- KEYS[1] open:<side>   ids this side saw and the other side has not (zset, score = first seen ms)
-- KEYS[2] open:<other>
-- KEYS[3] paired:<side>  ids the other side completed before this side's first sight was recorded
-- KEYS[4] paired:<other>
-- KEYS[5] untracked:<side>  ids not listed because open:<side> was full (a counter)
-- KEYS[6..] count buckets (hashes side -> count): the minute buckets, then the day buckets
-- ARGV[1] side   ARGV[2] most ids listed per side   ARGV[3] how long an id is kept, ms
-- ARGV[4] minute bucket TTL, ms   ARGV[5] day bucket TTL, ms   ARGV[6] number of minute buckets
-- ARGV[7] how long the daemon held these sights before sending them, ms (listed ids are scored by
--         when they were first seen: now minus this)
-- ARGV[8 .. 7+#buckets] the count to add to each bucket
-- ARGV[8+#buckets ..]  'f'..id: this side saw id first   'p'..id: this side completed the pair
-- Returns the number of ids left unlisted because the list was full.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local side, cap, keep = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local minutes = tonumber(ARGV[6])
local seen = now - tonumber(ARGV[7])
local buckets = #KEYS - 5
for i = 1, buckets do
  redis.call('HINCRBY', KEYS[5 + i], side, tonumber(ARGV[7 + i]))
  redis.call('PEXPIRE', KEYS[5 + i], i <= minutes and tonumber(ARGV[4]) or tonumber(ARGV[5]))
end

local open, other_open, paired, other_paired = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local size, other_paired_size = redis.call('ZCARD', open), nil
-- paired:<side> is empty but for the rare race it covers: no need to look in it then.
local paired_size = redis.call('ZCARD', paired)
local unlisted = 0
for i = 8 + buckets, #ARGV do
  local kind, id = string.sub(ARGV[i], 1, 1), string.sub(ARGV[i], 2)
  if kind == 'p' then
    -- The pair is complete. If the other side's first sight is not recorded yet (its record call
    -- is still on the way), leave a note so that it is not listed when it arrives.
    if redis.call('ZREM', other_open, id) == 0 then
      other_paired_size = other_paired_size or redis.call('ZCARD', other_paired)
      if other_paired_size < cap then
        other_paired_size = other_paired_size + redis.call('ZADD', other_paired, 'NX', seen, id)
      end
    end
  elseif paired_size == 0 or redis.call('ZREM', paired, id) == 0 then
    if size < cap then
      size = size + redis.call('ZADD', open, 'NX', seen, id)
    else
      unlisted = unlisted + 1
    end
  end
end
if unlisted > 0 then
  redis.call('INCRBY', KEYS[5], unlisted)
  redis.call('PEXPIRE', KEYS[5], keep)
end
-- Entries older than an id record's retention go: the records they speak of are gone too.
for _, k in ipairs({open, paired, other_paired}) do
  redis.call('ZREMRANGEBYSCORE', k, '-inf', now - keep)
  redis.call('PEXPIRE', k, keep)
end
return unlisted
