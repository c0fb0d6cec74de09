-- Prepended to every script when it is loaded (see scripts.py): helpers shared by all of them.
-- Task records are hashes at ARGV-given prefix .. id, in the same hash-tag slot as the queue's KEYS.
-- Record fields: msg type prio owner status score enq ready att dlv max stage started finished
--                progress result error worker
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Append one status change to the queue's event stream (capped, approximately, at maxlen).
local function emit(events, maxlen, id, status, typ, owner, extra)
  local args = {'XADD', events, 'MAXLEN', '~', maxlen, '*',
                'id', id, 'status', status, 'type', typ or '', 'owner', owner or ''}
  if extra then
    for i = 1, #extra do args[#args + 1] = extra[i] end
  end
  redis.call(unpack(args))
end

local function task_error(code, message)
  return cjson.encode({code = code, message = message})
end
