-- Step one of bringing an event's state into Redis (src/recovery.rs): takes the event
-- off sale, creates its counters or raises `sold` to what PostgreSQL and the stream
-- hold (never lowers it), and makes sure its stream has the consumer group.
--
-- KEYS[1] inventory hash, KEYS[2] stream of sales, KEYS[3] the event's waiting room
-- ARGV[1] total seats, ARGV[2] seats sold for certain, ARGV[3] consumer group,
-- ARGV[4] a fresh token, ARGV[5] '1' to take the event off sale even when it was
-- checked on this server and is not behind (`reconcile --fix`), ARGV[6] the event's
-- seats per buyer ('' for no limit), ARGV[7] its hold time in seconds (both fixed when
-- the event is created, written again on every recovery), ARGV[8..11] its waiting
-- room (opens at, Unix ms; admitted per second; admission seconds; seed) or absent
--
-- Returns {state, run id, token, created, raised by}: state 'checked' when the event
-- is on sale on this server and not behind (nothing was changed), else 'begun'. The
-- token is the one of an attempt already under way (one cut short, or running in
-- another process), or ARGV[4]: every attempt since the event went off sale shares
-- it, so whichever completes first puts the event back on sale (recover_end.lua).

local run = server_run_id()
local inventory = redis.call('HMGET', KEYS[1], 'sold', 'run', 'fence')
local sold, durable = tonumber(inventory[1]), tonumber(ARGV[2])
if sold and inventory[2] == run and sold >= durable and ARGV[5] ~= '1' then
  return {'checked', run, '', 0, 0}
end

local group = redis.pcall('XGROUP', 'CREATE', KEYS[2], ARGV[3], '0', 'MKSTREAM')
if type(group) == 'table' and group.err and not string.find(group.err, 'BUSYGROUP') then
  return redis.error_reply(group.err)
end

local token = inventory[3] or ARGV[4]
if ARGV[8] then
  redis.call('HSET', KEYS[1], 'queued', '1')
  redis.call('HSET', KEYS[3], 'opens', ARGV[8], 'rate', ARGV[9], 'admission', ARGV[10], 'seed', ARGV[11])
end
if ARGV[6] ~= '' then
  redis.call('HSET', KEYS[1], 'limit', ARGV[6], 'hold', ARGV[7])
else
  redis.call('HSET', KEYS[1], 'hold', ARGV[7])
  redis.call('HDEL', KEYS[1], 'limit')
end
local created, raised = 0, 0
if not sold then
  redis.call('HSET', KEYS[1], 'total', ARGV[1], 'sold', durable, 'fence', token)
  created = 1
elseif sold < durable then
  redis.call('HSET', KEYS[1], 'sold', durable, 'fence', token)
  raised = durable - sold
else
  redis.call('HSET', KEYS[1], 'fence', token)
end
redis.call('HDEL', KEYS[1], 'run')
return {'begun', run, token, created, raised}
