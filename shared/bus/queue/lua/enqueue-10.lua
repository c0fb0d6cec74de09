-- Enqueue a batch of messages atomically (dedupe, ready or delayed, record, announce), then hand
-- the best ready ones to idle workers.
-- KEYS, ARGV[1..6]: the queue layout (see _lib.lua)
-- ARGV[7] dedupe prefix   ARGV[8] 1 to compute positions, 0 not to
-- then 9 per message: id, level (0-3), delay ms (0 = ready now), dedupe key ('' = none),
--   dedupe ttl ms, max retries, type, owner, message JSON.
--   An id is checked for an existing task (enqueueing a message again is a no-op), except one
--   marked with a leading '+': generated inside this very call (enqueue_batch), it cannot exist.
-- Announces: one 'queued' event per message when enqueued alone; a batch announces its created
--   messages in one event whose `ids` field lists them, comma-separated (one XADD, not n).
-- Returns: {duplicates, positions}: duplicates lists, for each message that already existed,
--   its 1-based index in the batch and the existing task's id; positions has one entry per
--   message (-1: unknown) when asked for, else is empty.
local dp, want_position = ARGV[7], ARGV[8] == '1'
local now = now_ms()
local now_s = int(now)
local delayed_any = false
local dups, ids_in_order = {}, {}
local added = {0, 0, 0, 0}
local created = 0
local zadd = {'ZADD', Q.ready}
local ids = {}
local batch = #ARGV > 17  -- more than one message

local function position(id)
  if not want_position then return -1 end
  local r = redis.call('ZRANK', Q.ready, id)
  if r then return r end
  r = redis.call('ZRANK', Q.delayed, id)
  if r then return redis.call('ZCARD', Q.ready) + r end
  return -1
end

for i = 9, #ARGV, 9 do
  local n = (i - 9) / 9 + 1
  local id, level, delay = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local dkey, typ, owner = ARGV[i + 3], ARGV[i + 6], ARGV[i + 7]
  local existing = false
  local generated = string.byte(id, 1) == 43  -- '+'
  if generated then id = string.sub(id, 2) end
  if dkey ~= '' then existing = redis.call('GET', dp .. dkey) end
  if (not existing) and (not generated) and redis.call('EXISTS', Q.tp .. id) == 1 then existing = id end
  if existing then
    dups[#dups + 1] = n; dups[#dups + 1] = existing
    ids_in_order[n] = existing
  else
    if dkey ~= '' then redis.call('SET', dp .. dkey, id, 'PX', ARGV[i + 4]) end
    local key, score = Q.tp .. id, int(ready_score(level))
    redis.call('HSET', key, 'msg', ARGV[i + 8], 'type', typ, 'prio', ARGV[i + 1], 'owner', owner,
      'status', 'queued', 'score', score, 'enq', now_s, 'max', ARGV[i + 5])
    if delay > 0 then
      local due = int(now + delay)
      redis.call('ZADD', Q.delayed, due, id)
      redis.call('HSET', key, 'ready', due)
      delayed_any = true
    else
      zadd[#zadd + 1] = score; zadd[#zadd + 1] = id
      added[level + 1] = added[level + 1] + 1
    end
    created = created + 1
    if batch then
      ids[#ids + 1] = id
    else
      emit(Q.events, Q.maxlen, id, 'queued', typ, owner, {'priority', level})
    end
    ids_in_order[n] = id
  end
end
if #zadd > 2 then redis.call(unpack(zadd)) end  -- one ZADD for the whole batch
if #ids > 0 then
  redis.call('XADD', Q.events, 'MAXLEN', '~', Q.maxlen, '*', 'ids', table.concat(ids, ','),
    'status', 'queued', 'count', #ids)
end
for level = 0, 3 do
  if added[level + 1] > 0 then redis.call('HINCRBY', Q.depth, level, added[level + 1]) end
end
local positions = {}
if want_position then  -- before hand-offs: a message handed to a worker at once had 0 before it
  for j = 1, #ids_in_order do positions[j] = position(ids_in_order[j]) end
end
save_stamp()
if created > 0 then
  redis.call('HINCRBY', Q.stats, 'enqueued', created)
  serve_idle(now)
  if delayed_any then wake_idle(now) end
end
return {dups, positions}
