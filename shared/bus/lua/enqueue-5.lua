-- Enqueue a batch of messages atomically (dedupe, ready or delayed, record, announce).
-- KEYS[1] ready    KEYS[2] delayed    KEYS[3] depth    KEYS[4] events    KEYS[5] stats
-- ARGV[1] task prefix   ARGV[2] dedupe prefix   ARGV[3] level weight (ms)   ARGV[4] events maxlen
-- ARGV[5] wake channel
-- then 9 per message: id, level (0-3), delay ms (0 = ready now), dedupe key ('' = none),
--   dedupe ttl ms, max retries, type, owner, message JSON
-- Returns: flat list of 3 per message: id (the first message's id when deduplicated),
--   created (1, or 0 when it already existed), position (-1 when unknown)
local ready, delayed, depth, events, stats = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local tp, dp, weight, maxlen, wake = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]
local now = now_ms()
local out = {}
local added = {0, 0, 0, 0}
local created = 0

local function position(id)
  local r = redis.call('ZRANK', ready, id)
  if r then return r end
  r = redis.call('ZRANK', delayed, id)
  if r then return redis.call('ZCARD', ready) + r end
  return -1
end

for i = 6, #ARGV, 9 do
  local id, level, delay = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local dkey, dttl = ARGV[i + 3], ARGV[i + 4]
  local typ, owner = ARGV[i + 6], ARGV[i + 7]
  local existing = false
  if dkey ~= '' then existing = redis.call('GET', dp .. dkey) end
  if (not existing) and redis.call('EXISTS', tp .. id) == 1 then existing = id end
  if existing then
    out[#out + 1] = existing; out[#out + 1] = 0; out[#out + 1] = position(existing)
  else
    if dkey ~= '' then redis.call('SET', dp .. dkey, id, 'PX', dttl) end
    local key, due, score = tp .. id, now + delay, level * weight + now
    redis.call('HSET', key, 'msg', ARGV[i + 8], 'type', typ, 'prio', level, 'owner', owner,
      'status', 'queued', 'score', score, 'enq', now, 'ready', due, 'att', 0, 'dlv', 0,
      'max', ARGV[i + 5], 'stage', 0)
    if delay > 0 then
      redis.call('ZADD', delayed, due, id)
    else
      redis.call('ZADD', ready, score, id)
      added[level + 1] = added[level + 1] + 1
    end
    created = created + 1
    emit(events, maxlen, id, 'queued', typ, owner, {'priority', level})
    out[#out + 1] = id; out[#out + 1] = 1; out[#out + 1] = position(id)
  end
end
for level = 0, 3 do
  if added[level + 1] > 0 then redis.call('HINCRBY', depth, level, added[level + 1]) end
end
if created > 0 then
  redis.call('HINCRBY', stats, 'enqueued', created)
  redis.call('PUBLISH', wake, 'e')
end
return out
