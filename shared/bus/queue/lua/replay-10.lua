-- Move dead letters back to the ready set as fresh messages (attempts reset, last error kept),
-- and hand them to idle workers.
-- KEYS, ARGV[1..6]: the queue layout (see _lib.lua)
-- ARGV[7] limit when replaying all   then ids (none = the oldest LIMIT dead letters)
-- Returns: the number replayed
local now = now_ms()
local ids = {}
if #ARGV > 7 then
  for i = 8, #ARGV do ids[#ids + 1] = ARGV[i] end
else
  ids = redis.call('ZRANGE', Q.dead, 0, tonumber(ARGV[7]) - 1)
end
local n = 0
for _, id in ipairs(ids) do
  if redis.call('ZREM', Q.dead, id) == 1 then
    local key = Q.tp .. id
    local f = redis.call('HMGET', key, 'prio', 'type', 'owner', 'msg')
    if f[1] and f[4] then
      local score = int(ready_score(f[1]))
      redis.call('HSET', key, 'status', 'queued', 'att', 0, 'score', score, 'ready', now)
      redis.call('HDEL', key, 'finished')
      redis.call('PERSIST', key)  -- queued again: kept until it finishes
      redis.call('ZADD', Q.ready, score, id)
      redis.call('HINCRBY', Q.depth, f[1], 1)
      emit(Q.events, Q.maxlen, id, 'queued', f[2], f[3], {'reason', 'replay'})
      n = n + 1
    else
      redis.call('DEL', key) -- nothing left to run: a record without a body cannot be replayed
    end
  end
end
save_stamp()
if n > 0 then
  redis.call('HINCRBY', Q.stats, 'replayed', n)
  serve_idle(now)
end
return n
