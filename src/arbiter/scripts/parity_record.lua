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
local size = redis.call('ZCARD', open)
-- paired:<side> is empty but for the rare race it covers: no need to look in it then.
local paired_size = redis.call('ZCARD', paired)
local unlisted = 0
-- The ids, split by kind. The two kinds touch different keys (a first sight open:<side> and
-- paired:<side>, a completed pair open:<other> and paired:<other>), so each kind can be applied
-- as a whole; within a kind, the ids are applied as if one after the other, as listed.
local firsts, pairs_ = {}, {}
for i = 8 + buckets, #ARGV do
  local kind, id = string.sub(ARGV[i], 1, 1), string.sub(ARGV[i], 2)
  if kind == 'p' then pairs_[#pairs_ + 1] = id else firsts[#firsts + 1] = id end
end

-- Variadic commands go in chunks: Lua's unpack takes a few thousand values at most.
local CHUNK = 500
local function each_chunk(list, per, fn)
  for from = 1, #list, CHUNK do
    local args = {}
    for j = from, math.min(from + CHUNK - 1, #list) do per(args, list[j]) end
    fn(args)
  end
end
local function add_listed(key, ids)
  each_chunk(ids, function(args, id)
    args[#args + 1] = seen
    args[#args + 1] = id
  end, function(args) redis.call('ZADD', key, 'NX', unpack(args)) end)
end

-- A completed pair removes the other side's first sight from its open list. A pair whose other
-- first sight is not listed (its record call is still on the way, or the same id came twice)
-- leaves a note in paired:<other> so that the first sight is not listed when it arrives.
if #pairs_ > 0 then
  local listed, unmatched, taken = {}, {}, {}
  local scores = {}
  each_chunk(pairs_, function(args, id) args[#args + 1] = id end, function(args)
    for _, v in ipairs(redis.call('ZMSCORE', other_open, unpack(args))) do
      scores[#scores + 1] = v
    end
  end)
  for j, id in ipairs(pairs_) do
    if scores[j] and not taken[id] then
      taken[id] = true
      listed[#listed + 1] = id
    else
      unmatched[#unmatched + 1] = id
    end
  end
  each_chunk(listed, function(args, id) args[#args + 1] = id end,
    function(args) redis.call('ZREM', other_open, unpack(args)) end)
  if #unmatched > 0 then
    local other_paired_size = redis.call('ZCARD', other_paired)
    for _, id in ipairs(unmatched) do
      if other_paired_size < cap then
        other_paired_size = other_paired_size + redis.call('ZADD', other_paired, 'NX', seen, id)
      end
    end
  end
end

-- A first sight is listed in open:<side> unless the other side's pair came first (noted in
-- paired:<side>, which is empty but for that rare race: no need to look in it then). The list
-- holds at most `cap` ids; beyond that they are only counted.
if #firsts > 0 then
  if paired_size == 0 and size + #firsts <= cap then
    -- Everything fits: one ZADD for the lot (a repeated id is added once, as one by one).
    add_listed(open, firsts)
  else
    for _, id in ipairs(firsts) do
      if paired_size == 0 or redis.call('ZREM', paired, id) == 0 then
        if size < cap then
          size = size + redis.call('ZADD', open, 'NX', seen, id)
        else
          unlisted = unlisted + 1
        end
      end
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
