-- Settle a batch of leased messages: complete, retry, fail, move to the next pipeline stage, or
-- release (graceful shutdown). Each entry is fenced by its delivery token: an entry whose lease was
-- lost (reclaimed, cancelled) is ignored, so a late worker can never clobber a newer delivery.
-- Messages put back in ready are handed to idle workers at once.
-- KEYS, ARGV[1..4]: the queue layout (see _lib.lua)
-- ARGV[5] record ttl ms   ARGV[6] per-second rate key prefix
-- then 5 per entry: id, delivery token, outcome, a, b
--   done:    a = result JSON ('' = none)
--   retry:   a = error JSON, b = delay ms
--   fail:    a = error JSON, b = final status (failed | dead | timeout)
--   next:    a = next stage's message JSON, b = JSON {type, level, delay_ms, max_retries}
--   release: (nothing) back to the front of its level; the interrupted attempt does not count
-- Returns: one integer per entry: 1 settled, 0 ignored (lease no longer held)
local ttl, ratep = ARGV[5], ARGV[6]
local now = now_ms()
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
    redis.call('HSET', key, 'status', 'queued', 'score', score, 'ready', now)
    requeued = true
  end
end

for i = 7, #ARGV, 5 do
  local id, token, outcome, a, b = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  local key = Q.tp .. id
  local f = redis.call('HMGET', key, 'status', 'dlv', 'prio', 'type', 'owner', 'score', 'att', 'stage')
  if f[1] ~= 'processing' or f[2] ~= token then
    out[#out + 1] = 0
  else
    out[#out + 1] = 1
    redis.call('ZREM', Q.leases, id)
    if outcome == 'done' then
      redis.call('HSET', key, 'status', 'completed', 'finished', now, 'result', a, 'progress', 1)
      redis.call('PEXPIRE', key, ttl)
      counts.processed = counts.processed + 1
      local extra = {}
      if #a <= INLINE_RESULT then extra = {'result', a} end
      emit(Q.events, Q.maxlen, id, 'completed', f[4], f[5], extra)
    elseif outcome == 'retry' then
      redis.call('HSET', key, 'error', a)
      requeue(key, id, f[3], tonumber(b))
      counts.retried = counts.retried + 1
      emit(Q.events, Q.maxlen, id, 'queued', f[4], f[5],
        {'reason', 'retry', 'attempts', f[7], 'retry_in_ms', b, 'error', a})
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
