-- Step one of bringing an event's state into Redis (src/gate/recovery): takes the event
-- off sale, so that nothing moves its seats until the last step, and writes its
-- settings; creates its counters if Redis lacks them (the last step sets them) and
-- makes sure its stream has the consumer group.
--
-- KEYS[1] inventory hash, KEYS[2] stream of seat movements, KEYS[3] the event's
-- waiting room
-- ARGV[1] total seats, ARGV[2] consumer group, ARGV[3] a fresh token, ARGV[4] '1' to
-- take the event off sale even when it was checked on this server (`reconcile
-- --fix`), ARGV[5] the event's seats per buyer ('' for no limit), ARGV[6] its hold
-- time in seconds (both fixed when the event is created, written again on every
-- recovery), ARGV[7..10] its waiting room (opens at, Unix ms; admitted per second;
-- admission seconds; seed) or absent
--
-- Returns {state, run id, token, created}: state 'checked' when the event is on sale
-- on this server and ARGV[4] is not '1' (nothing was changed), else 'begun'. The
-- token is the one of an attempt already under way (one cut short, or running in
-- another process), or ARGV[3]: every attempt since the event went off sale shares
-- it, so whichever completes first puts the event back on sale (recover_end.lua).

local run = server_run_id()
local inventory = redis.call('HMGET', KEYS[1], 'total', 'run', 'fence')
if inventory[1] and inventory[2] == run and ARGV[4] ~= '1' then
  return {'checked', run, '', 0}
end

local group = redis.pcall('XGROUP', 'CREATE', KEYS[2], ARGV[2], '0', 'MKSTREAM')
if type(group) == 'table' and group.err and not string.find(group.err, 'BUSYGROUP') then
  return redis.error_reply(group.err)
end

local token = inventory[3] or ARGV[3]
if ARGV[7] then
  redis.call('HSET', KEYS[1], 'queued', '1')
  redis.call('HSET', KEYS[3], 'opens', ARGV[7], 'rate', ARGV[8], 'admission', ARGV[9], 'seed', ARGV[10])
end
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[1], 'limit', ARGV[5], 'hold', ARGV[6])
else
  redis.call('HSET', KEYS[1], 'hold', ARGV[6])
  redis.call('HDEL', KEYS[1], 'limit')
end
local created = 0
if not inventory[1] then
  redis.call('HSET', KEYS[1], 'total', ARGV[1], 'sold', 0, 'held', 0)
  created = 1
end
redis.call('HSET', KEYS[1], 'fence', token)
redis.call('HDEL', KEYS[1], 'run')
return {'begun', run, token, created}
