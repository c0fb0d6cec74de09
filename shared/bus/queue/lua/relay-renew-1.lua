-- Extend the relay lease, only if this instance holds it (see relay.py).
-- KEYS[1] relay lease
-- ARGV[1] instance id   ARGV[2] lease ms
-- Returns: 1 if the lease is this instance's and was extended, 0 if another holds it or nobody does
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
