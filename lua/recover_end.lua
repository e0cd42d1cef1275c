-- Last step of bringing an event's state into Redis (src/gate/recovery): puts it back on
-- sale with the counters and sets an attempt rebuilt, provided the attempt began on
-- this same server process and no other attempt finished first.
--
-- KEYS[1] inventory hash, KEYS[2] live holds (sorted set), KEYS[3] seats per buyer,
-- KEYS[4] and KEYS[5] the attempt's rebuilt live holds and seats per buyer
-- ARGV[1] the token recover_begin.lua returned, ARGV[2] the run id it returned,
-- ARGV[3] seats sold, ARGV[4] seats held, ARGV[5] and ARGV[6] how many live holds
-- and buyers the attempt's sets must have
--
-- Returns {state, sold before, held before}: state 'checked' (on sale), or 'again'
-- when the server changed meanwhile (the attempt's writes may have gone to another
-- dataset) or the attempt's sets are not whole (one expired): it must begin again.

local inventory = redis.call('HMGET', KEYS[1], 'fence', 'run', 'sold', 'held')
local sold, held = tonumber(inventory[3]) or 0, tonumber(inventory[4]) or 0
if server_run_id() ~= ARGV[2] then
  return {'again', sold, held}
end
if inventory[1] ~= ARGV[1] then
  redis.call('DEL', KEYS[4], KEYS[5])
  if inventory[2] == ARGV[2] then
    return {'checked', sold, held} -- another attempt finished the job
  end
  return {'again', sold, held}
end

if redis.call('ZCARD', KEYS[4]) ~= tonumber(ARGV[5]) or redis.call('HLEN', KEYS[5]) ~= tonumber(ARGV[6]) then
  redis.call('DEL', KEYS[4], KEYS[5])
  return {'again', sold, held}
end

-- The attempt's set replaces the event's; an empty set was never created.
local function swap_in(rebuilt, live)
  if redis.call('EXISTS', rebuilt) == 1 then
    redis.call('RENAME', rebuilt, live)
    redis.call('PERSIST', live)
  else
    redis.call('DEL', live)
  end
end
swap_in(KEYS[4], KEYS[2])
swap_in(KEYS[5], KEYS[3])
redis.call('HSET', KEYS[1], 'sold', ARGV[3], 'held', ARGV[4], 'run', ARGV[2])
redis.call('HDEL', KEYS[1], 'fence')
return {'checked', sold, held}
