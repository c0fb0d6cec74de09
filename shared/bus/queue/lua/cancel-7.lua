-- End a queued, delayed or running task early: cancelled (by request) or timeout (its deadline
-- passed). A running task's worker is told on the control channel and settles nothing.
-- KEYS[1] task record   KEYS[2] ready   KEYS[3] delayed   KEYS[4] leases   KEYS[5] depth
-- KEYS[6] events        KEYS[7] stats
-- ARGV[1] id   ARGV[2] ms the ended task's record is kept   ARGV[3] events maxlen   ARGV[4] control channel
-- ARGV[5] reason   ARGV[6] final status: 'cancelled' or 'timeout' (also the error code and the
--   stats counter: 'cancelled' or 'timeout')
-- Returns: {code, status before}: 1 ended, 0 already finished (nothing done), -1 no such task
local key, ready, delayed, leases, depth, events, stats =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local id = ARGV[1]
local status = ARGV[6]
if status ~= 'cancelled' and status ~= 'timeout' then
  return redis.error_reply('cancel: final status must be cancelled or timeout')
end
local f = redis.call('HMGET', key, 'status', 'prio', 'type', 'owner')
if not f[1] then return {-1, ''} end
if f[1] == 'queued' then
  if redis.call('ZREM', ready, id) == 1 then redis.call('HINCRBY', depth, f[2], -1) end
  redis.call('ZREM', delayed, id)
elseif f[1] == 'processing' then
  redis.call('ZREM', leases, id)
  redis.call('PUBLISH', ARGV[4], id)
else
  return {0, f[1]}
end
local now = now_ms()
local err = task_error(status, ARGV[5])
redis.call('HSET', key, 'status', status, 'finished', now, 'error', err)
redis.call('PEXPIRE', key, ARGV[2])
redis.call('HINCRBY', stats, status, 1)
emit(events, ARGV[3], id, status, f[3], f[4], {'error', err})
return {1, f[1]}
