-- Adds to a set a recovery attempt rebuilds (src/gate/recovery/restore.rs): the live
-- holds (sorted set) or the buyers' counts (hash), only while the attempt owns the
-- event (see restore_holds.lua). The set lives a while, so that one left by an
-- attempt that died goes; the last step (recover_end.lua) swaps it in for good.
--
-- KEYS[1] inventory hash, KEYS[2] the attempt's set
-- ARGV[1] the attempt's token, ARGV[2] the run id it began on, ARGV[3] 'zset' or
-- 'hash', ARGV[4] seconds the set lives, then pairs: score and member, or field and
-- value (none: only the TTL)
-- Returns 1, or 0 when the attempt no longer owns the event (nothing written).

if server_run_id() ~= ARGV[2] or redis.call('HGET', KEYS[1], 'fence') ~= ARGV[1] then
  return 0
end
if #ARGV > 4 then
  redis.call(ARGV[3] == 'zset' and 'ZADD' or 'HSET', KEYS[2], unpack(ARGV, 5))
end
redis.call('EXPIRE', KEYS[2], ARGV[4])
return 1
