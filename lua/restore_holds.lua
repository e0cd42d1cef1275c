-- Writes hold hashes as a recovery attempt worked them out (src/gate/recovery/restore.rs),
-- only while that attempt still owns the event: on the server it began on, with its
-- token in place. An attempt that another one overtook must not write over holds
-- confirmed or released since the event went back on sale.
--
-- KEYS[1] inventory hash, then one hold hash per hold
-- ARGV[1] the attempt's token, ARGV[2] the run id it began on; then 10 per hold:
-- state, seats, buyer, request key, expiry (Unix ms), made (Unix ms), seats left
-- after the hold, ended (Unix ms, '' if not), seats left after its sale ('' if not
-- confirmed), when the hash expires (Unix ms)
-- Returns 1, or 0 when the attempt no longer owns the event (nothing written).

if server_run_id() ~= ARGV[2] or redis.call('HGET', KEYS[1], 'fence') ~= ARGV[1] then
  return 0
end
for i = 2, #KEYS do
  local a = 3 + (i - 2) * 10
  redis.call('HSET', KEYS[i], 's', ARGV[a], 'q', ARGV[a + 1], 'b', ARGV[a + 2], 'k', ARGV[a + 3],
    'x', ARGV[a + 4], 'c', ARGV[a + 5], 'l', ARGV[a + 6])
  for field, value in pairs({ e = ARGV[a + 7], r = ARGV[a + 8] }) do
    if value ~= '' then
      redis.call('HSET', KEYS[i], field, value)
    else
      redis.call('HDEL', KEYS[i], field)
    end
  end
  redis.call('PEXPIREAT', KEYS[i], ARGV[a + 9])
end
return 1
