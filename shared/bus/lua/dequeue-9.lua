-- Lease up to COUNT messages to one worker, after reclaiming expired leases and promoting due
-- delayed messages.
-- KEYS[1] ready   KEYS[2] delayed   KEYS[3] leases   KEYS[4] depth   KEYS[5] events
-- KEYS[6] paused  KEYS[7] latency   KEYS[8] dead     KEYS[9] stats
-- ARGV[1] task prefix   ARGV[2] count   ARGV[3] lease ms   ARGV[4] worker id   ARGV[5] events maxlen
-- ARGV[6] level weight (ms)
-- Returns: {ms until the next delayed message or lease deadline (-1: none), then 4 per leased
--   message: id, message JSON, attempt number, delivery token}
local ready, delayed, leases, depth, events = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local paused, latency, dead, stats = KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local tp, count, lease = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local worker, maxlen, weight = ARGV[4], ARGV[5], tonumber(ARGV[6])
local now = now_ms()

local function bury(key, id, typ, owner, err)
  redis.call('HSET', key, 'status', 'dead', 'finished', now, 'error', err)
  redis.call('PERSIST', key)
  redis.call('ZADD', dead, now, id)
  redis.call('HINCRBY', stats, 'failed', 1)
  emit(events, maxlen, id, 'dead', typ, owner, {'error', err})
end

-- 1. Leases whose worker died: back to the front of their level, or dead when out of attempts.
local expired = redis.call('ZRANGEBYSCORE', leases, '-inf', now, 'LIMIT', 0, 100)
for _, id in ipairs(expired) do
  local key = tp .. id
  redis.call('ZREM', leases, id)
  local f = redis.call('HMGET', key, 'status', 'att', 'max', 'prio', 'score', 'type', 'owner')
  if f[1] == 'processing' then
    if tonumber(f[2]) > tonumber(f[3]) then
      bury(key, id, f[6], f[7], task_error('lease_expired',
        'the lease expired on every attempt (' .. f[2] .. '): its worker kept dying'))
    else
      redis.call('ZADD', ready, f[5], id)
      redis.call('HINCRBY', depth, f[4], 1)
      redis.call('HSET', key, 'status', 'queued')
      redis.call('HINCRBY', stats, 'reclaimed', 1)
      emit(events, maxlen, id, 'queued', f[6], f[7], {'reason', 'lease_expired'})
    end
  end
end

-- 2. Delayed messages that are due join their level, ordered by their due time.
local due = redis.call('ZRANGEBYSCORE', delayed, '-inf', now, 'WITHSCORES', 'LIMIT', 0, 1000)
for i = 1, #due, 2 do
  local id = due[i]
  local key = tp .. id
  redis.call('ZREM', delayed, id)
  local level = redis.call('HGET', key, 'prio')
  if level then
    local score = tonumber(level) * weight + tonumber(due[i + 1])
    redis.call('ZADD', ready, score, id)
    redis.call('HSET', key, 'score', score)
    redis.call('HINCRBY', depth, level, 1)
  end
end

-- 3. Lease the best COUNT ready messages.
local out = {-1}
if count > 0 and redis.call('EXISTS', paused) == 0 then
  local popped = redis.call('ZPOPMIN', ready, count)
  local lats, taken = {}, {}
  for i = 1, #popped, 2 do
    local id = popped[i]
    local key = tp .. id
    local f = redis.call('HMGET', key, 'msg', 'prio', 'ready', 'type', 'owner', 'status')
    if f[2] then taken[f[2]] = (taken[f[2]] or 0) + 1 end
    if not f[1] then
      bury(key, id, f[4], f[5], task_error('malformed', 'the task record has no message body'))
    elseif f[6] == 'queued' then
      local att = redis.call('HINCRBY', key, 'att', 1)
      local dlv = redis.call('HINCRBY', key, 'dlv', 1)
      redis.call('HSET', key, 'status', 'processing', 'started', now, 'worker', worker)
      redis.call('ZADD', leases, now + lease, id)
      lats[#lats + 1] = now - tonumber(f[3])
      emit(events, maxlen, id, 'processing', f[4], f[5], {'attempts', att, 'worker', worker})
      out[#out + 1] = id; out[#out + 1] = f[1]; out[#out + 1] = att; out[#out + 1] = dlv
    end
  end
  for level, n in pairs(taken) do redis.call('HINCRBY', depth, level, -n) end
  if #lats > 0 then
    redis.call('LPUSH', latency, unpack(lats))
    redis.call('LTRIM', latency, 0, 999)
  end
end

-- 4. When to look again even if nobody wakes us.
local nxt = -1
local d = redis.call('ZRANGE', delayed, 0, 0, 'WITHSCORES')
if #d > 0 then nxt = tonumber(d[2]) end
local l = redis.call('ZRANGE', leases, 0, 0, 'WITHSCORES')
if #l > 0 and (nxt < 0 or tonumber(l[2]) < nxt) then nxt = tonumber(l[2]) end
if nxt >= 0 then out[1] = math.max(0, nxt - now) end
return out
