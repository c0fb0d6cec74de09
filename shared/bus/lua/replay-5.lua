-- Move dead letters back to the ready set as fresh messages (attempts reset, last error kept).
-- KEYS[1] dead   KEYS[2] ready   KEYS[3] depth   KEYS[4] events   KEYS[5] stats
-- ARGV[1] task prefix   ARGV[2] level weight (ms)   ARGV[3] events maxlen   ARGV[4] wake channel
-- ARGV[5] limit when replaying all   then ids ('' list = the oldest LIMIT dead letters)
-- Returns: the number replayed
local dead, ready, depth, events, stats = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local tp, weight, maxlen, wake = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
local now = now_ms()
local ids = {}
if #ARGV > 5 then
  for i = 6, #ARGV do ids[#ids + 1] = ARGV[i] end
else
  ids = redis.call('ZRANGE', dead, 0, tonumber(ARGV[5]) - 1)
end
local n = 0
for _, id in ipairs(ids) do
  if redis.call('ZREM', dead, id) == 1 then
    local key = tp .. id
    local f = redis.call('HMGET', key, 'prio', 'type', 'owner', 'msg')
    if f[1] and f[4] then
      local score = tonumber(f[1]) * weight + now
      redis.call('HSET', key, 'status', 'queued', 'att', 0, 'score', score, 'ready', now)
      redis.call('HDEL', key, 'finished')
      redis.call('ZADD', ready, score, id)
      redis.call('HINCRBY', depth, f[1], 1)
      emit(events, maxlen, id, 'queued', f[2], f[3], {'reason', 'replay'})
      n = n + 1
    else
      redis.call('DEL', key) -- nothing left to run: a malformed record cannot be replayed
    end
  end
end
if n > 0 then
  redis.call('HINCRBY', stats, 'replayed', n)
  redis.call('PUBLISH', wake, 'r')
end
return n
