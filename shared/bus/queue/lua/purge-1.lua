-- Delete dead letters and their records.
-- KEYS[1] dead
-- ARGV[1] task prefix   ARGV[2] limit when purging all   then ids ('' list = the oldest LIMIT)
-- Returns: the number purged
local dead, tp = KEYS[1], ARGV[1]
local ids = {}
if #ARGV > 2 then
  for i = 3, #ARGV do ids[#ids + 1] = ARGV[i] end
else
  ids = redis.call('ZRANGE', dead, 0, tonumber(ARGV[2]) - 1)
end
local n = 0
for _, id in ipairs(ids) do
  if redis.call('ZREM', dead, id) == 1 then
    redis.call('DEL', tp .. id)
    n = n + 1
  end
end
return n
