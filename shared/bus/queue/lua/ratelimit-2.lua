-- One user's admission (ratelimit.py): a token bucket and a set of held slots, checked together;
-- what is asked for is taken only if both allow it (a refused request spends nothing).
-- Uses nothing of _lib.lua (not the queue layout). Both keys share the user's hash tag (keys.LimitKeys).
-- KEYS[1] bucket: hash tokens, stamp (server ms)   KEYS[2] slots: zset member -> expiry (server ms)
-- ARGV[1] rate, tokens a second ('' = no bucket)   ARGV[2] burst   ARGV[3] cost (tokens)
-- ARGV[4] most slots held at once ('' = no slots)   ARGV[5] slot ttl (ms)
-- ARGV[6..] members to hold (already held ones are renewed, not counted again)
-- Returns {1, tokens left (thousandths), slots held} when admitted;
--         {-1, ms until the cost is affordable, 0} when the bucket is short;
--         {-2, slots held, 0} when the slots are full.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rate, burst, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tokens = 0

if rate then
  local f = redis.call('HMGET', KEYS[1], 'tokens', 'stamp')
  local stamp = tonumber(f[2]) or now
  tokens = math.min(burst, (tonumber(f[1]) or burst) + math.max(0, now - stamp) * rate / 1000)
  if tokens + 1e-9 < cost then  -- float refill must not refuse a whole token by 1e-16
    return {-1, math.ceil((cost - tokens) * 1000 / rate), 0}
  end
end

local limit = tonumber(ARGV[4])
local held = 0
if limit then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)  -- expired: a killed gateway's sockets
  held = redis.call('ZCARD', KEYS[2])
  local new = 0
  for i = 6, #ARGV do
    if not redis.call('ZSCORE', KEYS[2], ARGV[i]) then new = new + 1 end
  end
  if held + new > limit then return {-2, held, 0} end
  if #ARGV >= 6 then
    local expiry = string.format('%.0f', now + tonumber(ARGV[5]))
    local zadd = {'ZADD', KEYS[2]}
    for i = 6, #ARGV do zadd[#zadd + 1] = expiry; zadd[#zadd + 1] = ARGV[i] end
    redis.call(unpack(zadd))
    held = held + new
    -- the set lives as long as its longest-lived member
    local last = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
    redis.call('PEXPIREAT', KEYS[2], string.format('%.0f', tonumber(last[2]) + 1000))
  end
end

if rate then
  tokens = math.max(0, tokens - cost)
  redis.call('HSET', KEYS[1], 'tokens', string.format('%.6f', tokens), 'stamp', string.format('%.0f', now))
  -- once full again the bucket is the same as no bucket: let it go
  redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) * 1000 / rate) + 1000)
end
return {1, math.floor(tokens * 1000), held}
