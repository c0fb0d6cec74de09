-- Give up the relay lease, only if this instance holds it (see relay.py), so another takes over at once.
-- KEYS[1] relay lease
-- ARGV[1] instance id
-- Returns: 1 if the lease was this instance's and is now free, 0 if it was not held by this instance
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
