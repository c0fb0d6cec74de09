-- Settle what the worker finished, then lease it up to COUNT messages, after reclaiming expired
-- leases and promoting due delayed messages: acks and the next batch share one round trip. A worker that got fewer than it asked for is registered as idle, so the next
-- enqueue hands it a message directly (see serve_idle).
-- KEYS, ARGV[1..6]: the queue layout (see _lib.lua)
-- ARGV[7] count   ARGV[8] lease ms   ARGV[9] worker id   ARGV[10] idle registration ttl ms (0: don't)
-- ARGV[11] per-second rate key prefix
-- ARGV[12] wait ms: how long the BLPOP on the worker's inbox that the caller sent right behind this
--   call (same round trip) blocks; 0 if none. When the worker should not block (it got all it asked
--   for, or something falls due before the wait would end), an empty entry (a wake-up) is pushed to
--   its inbox, so that BLPOP returns at once.
-- then settle entries, as settle-10.lua
-- Returns: {ms until the next delayed message or lease deadline (-1: none), then one delivery
--   string per leased message (see lease_to), then, with a wait, 1 if it was cut short, else 0}
local count, lease, worker, idle_ttl = tonumber(ARGV[7]), tonumber(ARGV[8]), ARGV[9], tonumber(ARGV[10])
local wait_ms = tonumber(ARGV[12])
local asked = math.min(count, 1000)  -- bounded batches keep unpack() within Lua's stack
count = asked
local now = now_ms()
if #ARGV > 12 then settle_from(13, ARGV[11]) end

-- 0. Dead letters older than their retention: their records have expired (see bury); drop the ids.
redis.call('ZREMRANGEBYSCORE', Q.dead, '-inf', int(now - tonumber(Q.dead_ttl)))

-- 1. Leases whose worker died: back to the front of their level, or dead when out of attempts.
--    A delivery still unread in the worker's inbox never ran: it is taken back, uncharged.
for _, id in ipairs(redis.call('ZRANGEBYSCORE', Q.leases, '-inf', now, 'LIMIT', 0, 100)) do
  local key = Q.tp .. id
  redis.call('ZREM', Q.leases, id)
  local f = redis.call('HMGET', key, 'status', 'att', 'max', 'prio', 'score', 'type', 'owner', 'worker',
    'dlv', 'msg')
  if f[1] == 'processing' and f[8] and f[10] then
    local unread = id .. '\n' .. f[2] .. '\n' .. f[9] .. '\n' .. f[10]
    if redis.call('LREM', Q.inbox .. f[8], 1, unread) == 1 then
      f[2] = tostring(redis.call('HINCRBY', key, 'att', -1))
    end
  end
  if f[1] == 'processing' then
    if tonumber(f[2]) > tonumber(f[3]) then
      bury(id, 'dead', f[6], f[7], task_error('lease_expired',
        'the lease expired on every attempt (' .. f[2] .. '): its worker kept dying'), now)
    else
      redis.call('ZADD', Q.ready, f[5], id)
      redis.call('HINCRBY', Q.depth, f[4], 1)
      redis.call('HSET', key, 'status', 'queued')
      redis.call('HINCRBY', Q.stats, 'reclaimed', 1)
      emit(Q.events, Q.maxlen, id, 'queued', f[6], f[7], {'reason', 'lease_expired'})
    end
  end
end

-- 2. Delayed messages that are due join their level, ordered by their due time.
local due = redis.call('ZRANGEBYSCORE', Q.delayed, '-inf', now, 'WITHSCORES', 'LIMIT', 0, 1000)
for i = 1, #due, 2 do
  local id = due[i]
  local key = Q.tp .. id
  redis.call('ZREM', Q.delayed, id)
  local level = redis.call('HGET', key, 'prio')
  if level then
    local score = int(tonumber(level) * Q.weight + tonumber(due[i + 1]) * 1000)
    redis.call('ZADD', Q.ready, score, id)
    redis.call('HSET', key, 'score', score)
    redis.call('HINCRBY', Q.depth, level, 1)
  end
end

-- 3. What was handed to this worker's inbox while it was busy comes first (already leased to it).
local out = {-1}
local inbox = Q.inbox .. worker
local handed = redis.call('LRANGE', inbox, 0, -1)
if #handed > 0 then
  redis.call('DEL', inbox)
  for _, d in ipairs(handed) do
    local id, token = string.match(d, '^([^\n]+)\n[^\n]*\n([^\n]*)\n')
    if id then
      local f = redis.call('HMGET', Q.tp .. id, 'status', 'dlv', 'worker')
      if f[1] == 'processing' and f[2] == token and f[3] == worker then
        out[#out + 1] = d
        count = count - 1
      end
    end
  end
end

-- 4. Lease the best COUNT ready messages.
local paused = redis.call('EXISTS', Q.paused) == 1
local leased = 0
if count > 0 and not paused then
  local popped = redis.call('ZPOPMIN', Q.ready, count)
  local acc = new_acc(now, lease)
  for i = 1, #popped, 2 do
    local delivery = lease_to(popped[i], worker, acc)
    if delivery then
      out[#out + 1] = delivery
      leased = leased + 1
    end
  end
  settle_acc(acc)
end
local member = lease .. ':' .. worker
redis.call('ZREMRANGEBYSCORE', Q.idle, '-inf', now - 1)  -- registrations whose worker stopped polling
if idle_ttl > 0 and count > 0 and leased < count then
  redis.call('ZADD', Q.idle, int(now + idle_ttl), member)
else
  redis.call('ZREM', Q.idle, member)
end

-- 5. When to look again even if nobody hands us anything.
local nxt = -1
local d = redis.call('ZRANGE', Q.delayed, 0, 0, 'WITHSCORES')
if #d > 0 then nxt = tonumber(d[2]) end
local l = redis.call('ZRANGE', Q.leases, 0, 0, 'WITHSCORES')
if #l > 0 and (nxt < 0 or tonumber(l[2]) < nxt) then nxt = tonumber(l[2]) end
if nxt >= 0 then out[1] = math.max(0, nxt - now) end

-- 6. The wait behind this call: cut short unless the worker has room and nothing falls due first.
if wait_ms > 0 then
  local cut = (asked > 0 and count <= leased) or (nxt >= 0 and nxt - now < wait_ms)
  if cut then redis.call('RPUSH', inbox, '') end
  out[#out + 1] = cut and 1 or 0
end
return out
