-- Record a running task's progress and announce it.
-- KEYS[1] task record   KEYS[2] events
-- ARGV[1] id   ARGV[2] delivery token   ARGV[3] progress (0..1, '' = unchanged)   ARGV[4] delta text
-- ARGV[5] events maxlen
-- Returns: 1 recorded, 0 ignored (the lease is no longer held)
local key, events = KEYS[1], KEYS[2]
local f = redis.call('HMGET', key, 'status', 'dlv', 'type', 'owner')
if f[1] ~= 'processing' or f[2] ~= ARGV[2] then return 0 end
local extra = {}
if ARGV[3] ~= '' then
  redis.call('HSET', key, 'progress', ARGV[3])
  extra = {'progress', ARGV[3]}
end
if ARGV[4] ~= '' then extra[#extra + 1] = 'delta'; extra[#extra + 1] = ARGV[4] end
emit(events, ARGV[5], ARGV[1], 'processing', f[3], f[4], extra)
return 1
