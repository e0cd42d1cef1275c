-- Last step of bringing an event's state into Redis (src/recovery.rs): puts it back on
-- sale, provided its idempotency records were restored by an attempt that began on
-- this same server process since the event last went off sale.
--
-- KEYS[1] inventory hash
-- ARGV[1] the token recover_begin.lua returned, ARGV[2] the run id it returned
--
-- Returns 'checked' (on sale), or 'again' when the server changed or the event was
-- lost and recreated meanwhile: the caller's restore may have gone to another
-- dataset, so it must begin again.

local inventory = redis.call('HMGET', KEYS[1], 'fence', 'run')
if server_run_id() ~= ARGV[2] then
  return 'again'
end
if inventory[1] == ARGV[1] then
  redis.call('HSET', KEYS[1], 'run', ARGV[2])
  redis.call('HDEL', KEYS[1], 'fence')
  return 'checked'
end
if inventory[2] == ARGV[2] then
  return 'checked'
end
return 'again'
