-- Prepended to every script when it is loaded (see scripts.py): helpers shared by all of them.
--
-- The queue scripts (enqueue, dequeue, settle, replay, wake) share one KEYS/ARGV layout, held in Q:
--   KEYS[1] ready   KEYS[2] delayed   KEYS[3] leases   KEYS[4] depth   KEYS[5] events
--   KEYS[6] paused  KEYS[7] latency   KEYS[8] dead     KEYS[9] stats   KEYS[10] idle workers
--   ARGV[1] task prefix   ARGV[2] inbox prefix   ARGV[3] events maxlen   ARGV[4] level weight (us)
--   ARGV[5] ms a completed task's record is kept   ARGV[6] ms a dead letter (and its record) is kept
--   then the script's own arguments from ARGV[7].
-- Task records are hashes at task prefix .. id, inboxes lists at inbox prefix .. worker: both in
-- the queue's hash-tag slot.
-- Record fields: msg type prio owner status score enq ready att dlv max stage started finished
--                progress result error worker
local Q = {ready = KEYS[1], delayed = KEYS[2], leases = KEYS[3], depth = KEYS[4], events = KEYS[5],
           paused = KEYS[6], latency = KEYS[7], dead = KEYS[8], stats = KEYS[9], idle = KEYS[10],
           tp = ARGV[1], inbox = ARGV[2], maxlen = ARGV[3], weight = tonumber(ARGV[4]),
           completed_ttl = ARGV[5], dead_ttl = ARGV[6]}

local now_us_cached = nil

-- Server time: ms for timestamps, us for ready-set order. One TIME call per script.
local function now_ms()
  if not now_us_cached then
    local t = redis.call('TIME')
    now_us_cached = tonumber(t[1]) * 1000000 + tonumber(t[2])
  end
  return math.floor(now_us_cached / 1000)
end

-- Ready-set order: level * weight + a per-queue stamp that strictly increases (server us, or
-- the last stamp + 1 when several land in the same microsecond), so every level is FIFO even
-- for caller-chosen ids. The last stamp lives in the stats hash; `save_stamp` writes it back.
local last_stamp = nil
local function ready_score(level)
  now_ms()
  if not last_stamp then last_stamp = tonumber(redis.call('HGET', Q.stats, 'stamp') or 0) end
  last_stamp = math.max(now_us_cached, last_stamp + 1)
  return tonumber(level) * Q.weight + last_stamp
end

local function save_stamp()
  if last_stamp then redis.call('HSET', Q.stats, 'stamp', string.format('%.0f', last_stamp)) end
end

-- Integer text of a number. Numbers handed to redis.call are formatted with %.17g each time, which
-- costs more than the command itself here: hot paths format once and pass strings.
local function int(n)
  return string.format('%.0f', n)
end

-- Append one status change to the queue's event stream (capped, approximately, at maxlen).
local function emit(events, maxlen, id, status, typ, owner, extra)
  local args = {'XADD', events, 'MAXLEN', '~', maxlen, '*',
                'id', id, 'status', status, 'type', typ or '', 'owner', owner or ''}
  if extra then
    for i = 1, #extra do args[#args + 1] = extra[i] end
  end
  redis.call(unpack(args))
end

local function task_error(code, message)
  return cjson.encode({code = code, message = message})
end

-- Move a task to the dead-letter set with `status` and `err`; it stays until replayed, purged, or
-- Q.dead_ttl has passed (its record expires then; dequeue drops its id from the set).
local function bury(id, status, typ, owner, err, now)
  local key = Q.tp .. id
  redis.call('HSET', key, 'status', status, 'finished', now, 'error', err)
  redis.call('PEXPIRE', key, Q.dead_ttl)
  redis.call('ZADD', Q.dead, now, id)
  redis.call('HINCRBY', Q.stats, 'failed', 1)
  emit(Q.events, Q.maxlen, id, status, typ, owner, {'error', err})
end

-- Lease `id` (just popped from ready) to `worker` for `lease` ms. Returns the delivery as one
-- string "id\nattempt\ntoken\nmessage JSON", or nil when there was nothing to deliver.
-- Depth decrements and start-latency samples are collected in `acc` and applied by settle_acc.
local function lease_to(id, worker, acc)
  local key = Q.tp .. id
  local f = redis.call('HMGET', key, 'msg', 'prio', 'ready', 'type', 'owner', 'status', 'enq', 'att', 'dlv')
  if f[2] then acc.taken[f[2]] = (acc.taken[f[2]] or 0) + 1 end
  if not f[1] then
    bury(id, 'dead', f[4], f[5], task_error('malformed', 'the task record has no message body'), acc.now)
    return nil
  end
  if f[6] ~= 'queued' then return nil end  -- stale entry: the record moved on
  local att = tostring((tonumber(f[8]) or 0) + 1)
  local dlv = tostring((tonumber(f[9]) or 0) + 1)
  redis.call('HSET', key, 'status', 'processing', 'started', acc.now_s, 'worker', worker, 'att', att,
    'dlv', dlv)
  acc.leases[#acc.leases + 1] = acc.deadline_s
  acc.leases[#acc.leases + 1] = id
  acc.lats[#acc.lats + 1] = int(acc.now - tonumber(f[3] or f[7]))
  emit(Q.events, Q.maxlen, id, 'processing', f[4], f[5], {'attempts', att, 'worker', worker})
  return id .. '\n' .. att .. '\n' .. dlv .. '\n' .. f[1]
end

-- What a batch of lease_to calls shares: the time, the lease deadline, and what they accumulate.
local function new_acc(now, lease)
  return {taken = {}, lats = {}, leases = {'ZADD', Q.leases}, now = now, now_s = int(now),
          deadline_s = int(now + lease)}
end

local function settle_acc(acc)
  if #acc.leases > 2 then redis.call(unpack(acc.leases)) end
  for level, n in pairs(acc.taken) do redis.call('HINCRBY', Q.depth, level, -n) end
  if #acc.lats > 0 and redis.call('LPUSH', Q.latency, unpack(acc.lats)) > 1100 then
    redis.call('LTRIM', Q.latency, 0, 999)  -- the last ~1,000 samples
  end
end

-- Wake every idle worker at once (an empty inbox entry is a wake-up, not a delivery): used when a
-- delayed message is added, so workers re-read when the next one is due.
local function wake_idle(now)
  for _, member in ipairs(redis.call('ZRANGEBYSCORE', Q.idle, now, '+inf')) do
    local worker = string.match(member, '^%d+:(.+)$')
    if worker then redis.call('RPUSH', Q.inbox .. worker, '') end
  end
end

-- Hand the best ready messages to workers blocked on their inbox, one each, already leased; a
-- registration that has expired (its worker stopped polling) is dropped. Idle members are
-- "lease_ms:worker". Returns how many were served.
local function serve_idle(now)
  if redis.call('EXISTS', Q.paused) == 1 then return 0 end
  local served = 0  -- expired registrations are skipped here and dropped by dequeue
  for _, member in ipairs(redis.call('ZRANGEBYSCORE', Q.idle, now, '+inf')) do
    local lease, worker = string.match(member, '^(%d+):(.+)$')
    local acc = new_acc(now, tonumber(lease))
    local delivery = nil
    while not delivery do
      local popped = redis.call('ZPOPMIN', Q.ready, 1)
      if #popped == 0 then break end
      delivery = lease_to(popped[1], worker, acc)
    end
    settle_acc(acc)
    if not delivery then break end
    redis.call('ZREM', Q.idle, member)
    redis.call('RPUSH', Q.inbox .. worker, delivery)
    served = served + 1
  end
  return served
end

-- Settle leased messages given as ARGV groups of 5 from index `first` (see settle-10.lua for the
-- outcomes): complete, retry, fail, next pipeline stage, or release. Each entry is fenced by its
-- delivery token. A completed task's record is kept Q.completed_ttl ms. Returns one integer per
-- entry: 1 settled, 0 ignored (lease no longer held).
local function settle_from(first, ratep)
  local now = now_ms()
  local now_s = int(now)
  local out = {}
  local counts = {processed = 0, retried = 0, failed = 0}
  local requeued, delayed_any = false, false
  local INLINE_RESULT = 16384  -- results up to this size ride along in the event itself

  -- Put a message back in the queue: delayed, or ready at `score` (default: the back of its level).
  local function requeue(key, id, level, delay, score)
    if delay > 0 then
      redis.call('ZADD', Q.delayed, int(now + delay), id)
      redis.call('HSET', key, 'status', 'queued', 'ready', int(now + delay))
      delayed_any = true
    else
      score = score or int(ready_score(level))
      redis.call('ZADD', Q.ready, score, id)
      redis.call('HINCRBY', Q.depth, level, 1)
      redis.call('HSET', key, 'status', 'queued', 'score', score, 'ready', now_s)
      requeued = true
    end
  end

  for i = first, #ARGV, 5 do
    local id, token, outcome, a, b = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
    local key = Q.tp .. id
    local f = redis.call('HMGET', key, 'status', 'dlv', 'prio', 'type', 'owner', 'score', 'att', 'stage')
    if f[1] ~= 'processing' or f[2] ~= token then
      out[#out + 1] = 0
    else
      out[#out + 1] = 1
      redis.call('ZREM', Q.leases, id)
      if outcome == 'done' then
        redis.call('HSET', key, 'status', 'completed', 'finished', now_s, 'result', a, 'progress', '1')
        redis.call('PEXPIRE', key, Q.completed_ttl)
        counts.processed = counts.processed + 1
        local extra = {}
        if #a <= INLINE_RESULT then extra = {'result', a} end
        emit(Q.events, Q.maxlen, id, 'completed', f[4], f[5], extra)
      elseif outcome == 'retry' then
        redis.call('HSET', key, 'error', a)
        requeue(key, id, f[3], tonumber(b))
        counts.retried = counts.retried + 1
        emit(Q.events, Q.maxlen, id, 'queued', f[4], f[5],
          {'reason', 'retry', 'attempts', f[7], 'retry_in_ms', b, 'due', int(now + tonumber(b)), 'error', a})
      elseif outcome == 'fail' then
        bury(id, b, f[4], f[5], a, now)  -- bury counts it in stats
        counts.failed = counts.failed + 1
      elseif outcome == 'next' then
        local meta = cjson.decode(b)
        local stage = tonumber(f[8] or 0) + 1
        redis.call('HSET', key, 'msg', a, 'type', meta.type, 'prio', meta.level, 'max', meta.max_retries,
          'att', 0, 'stage', stage, 'progress', '', 'error', '')
        requeue(key, id, tostring(meta.level), tonumber(meta.delay_ms))
        counts.processed = counts.processed + 1
        emit(Q.events, Q.maxlen, id, 'queued', meta.type, f[5],
          {'reason', 'next_stage', 'stage', stage, 'retry_in_ms', meta.delay_ms})
      else -- release
        redis.call('HINCRBY', key, 'att', -1)
        requeue(key, id, f[3], 0, f[6])
        emit(Q.events, Q.maxlen, id, 'queued', f[4], f[5], {'reason', 'released'})
      end
    end
  end

  local rate = ratep .. math.floor(now / 1000)
  for name, n in pairs(counts) do
    if n > 0 then
      if name ~= 'failed' then redis.call('HINCRBY', Q.stats, name, n) end
      redis.call('HINCRBY', rate, name, n)
      redis.call('EXPIRE', rate, 180)
    end
  end
  save_stamp()
  if requeued then serve_idle(now) end
  if delayed_any then wake_idle(now) end
  return out
end
