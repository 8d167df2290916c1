-- Changes the switches atomically, appends the change to the audit trail and notifies every
-- instance. All three keys share the `{ctl}` hash tag, so this runs on a Redis Cluster too.
-- KEYS[1] switches hash   KEYS[2] whitelist set   KEYS[3] audit stream
-- ARGV[1] who and from where    ARGV[2] notification channel    ARGV[3] audit stream length cap
-- ARGV[4] consume: '' unchanged, '0', '1'     ARGV[5] percent: '' unchanged, or 0..100
-- ARGV[6] whitelist op: '' | 'add' | 'remove' | 'seed' (seed: only when no switches exist yet)
-- ARGV[7..] business ids for the whitelist op
-- Returns {version, changed (0/1)}.
local sw, wl, audit = KEYS[1], KEYS[2], KEYS[3]
local cur = redis.call('HMGET', sw, 'consume', 'percent', 'version')
local consume, percent, version = cur[1] or '0', cur[2] or '0', tonumber(cur[3]) or 0
local op = ARGV[6]
if op == 'seed' and cur[3] then return {version, 0} end

local function onoff(v) if v == '1' then return 'on' else return 'off' end end
local function listed(ids)
  if #ids <= 20 then return table.concat(ids, ',') end
  local head = {}
  for i = 1, 20 do head[i] = ids[i] end
  return table.concat(head, ',') .. ' (+' .. (#ids - 20) .. ' more)'
end

local changes = {}
if ARGV[4] ~= '' and ARGV[4] ~= consume then
  table.insert(changes, 'consume ' .. onoff(consume) .. ' -> ' .. onoff(ARGV[4]))
  consume = ARGV[4]
end
if ARGV[5] ~= '' and ARGV[5] ~= percent then
  table.insert(changes, 'percent ' .. percent .. ' -> ' .. ARGV[5])
  percent = ARGV[5]
end
local ids = {}
if op == 'add' or op == 'seed' then
  for i = 7, #ARGV do
    if redis.call('SADD', wl, ARGV[i]) == 1 then table.insert(ids, ARGV[i]) end
  end
  if #ids > 0 then table.insert(changes, 'whitelist +' .. listed(ids)) end
elseif op == 'remove' then
  for i = 7, #ARGV do
    if redis.call('SREM', wl, ARGV[i]) == 1 then table.insert(ids, ARGV[i]) end
  end
  if #ids > 0 then table.insert(changes, 'whitelist -' .. listed(ids)) end
end
if #changes == 0 and op ~= 'seed' then return {version, 0} end
if op == 'seed' then table.insert(changes, 1, 'seeded from config') end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
version = version + 1
redis.call('HSET', sw, 'consume', consume, 'percent', percent, 'version', version, 'at', now, 'by', ARGV[1])
redis.call('XADD', audit, 'MAXLEN', '~', ARGV[3], '*',
  'by', ARGV[1], 'action', 'switches', 'detail', 'v' .. version .. ': ' .. table.concat(changes, '; '))
redis.call('PUBLISH', ARGV[2], version)
return {version, 1}
