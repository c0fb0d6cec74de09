-- Extend the leases a worker still holds, and record its heartbeat; drop workers judged dead.
-- The workers set scores each worker by when it is judged dead: its last heartbeat plus its lease
-- (three missed renewals, the moment its leases expire too). A worker killed without deregistering
-- stays there until that time, then the next renewal of any worker of the queue removes it.
-- KEYS[1] leases   KEYS[2] workers
-- ARGV[1] task prefix   ARGV[2] lease ms   ARGV[3] worker id   then pairs: id, delivery token
-- Returns: the ids whose lease is no longer this worker's (cancelled, reclaimed, or gone)
local leases, workers = KEYS[1], KEYS[2]
local tp, lease, worker = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local now = now_ms()
redis.call('ZREMRANGEBYSCORE', workers, '-inf', '(' .. string.format('%.0f', now))
redis.call('ZADD', workers, string.format('%.0f', now + lease), worker)
local lost = {}
for i = 4, #ARGV, 2 do
  local id, token = ARGV[i], ARGV[i + 1]
  local f = redis.call('HMGET', tp .. id, 'status', 'dlv')
  if f[1] == 'processing' and f[2] == token then
    redis.call('ZADD', leases, string.format('%.0f', now + lease), id)
  else
    lost[#lost + 1] = id
  end
end
return lost
