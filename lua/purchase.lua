-- The purchase gate: the only code that sells seats. Runs atomically.
--
-- KEYS[1] inventory hash (total, sold, purchases, rejected, run)
-- KEYS[2] idempotency record of this key
-- KEYS[3] stream of sales, read by the consumer that writes PostgreSQL
-- ARGV[1] quantity, ARGV[2] purchase id (32 hex digits), ARGV[3] record TTL in
-- seconds, ARGV[4] the client's Idempotency-Key (carried to PostgreSQL)
--
-- Returns {kind, record}: kind 'new' or 'replay' with the record (formats in
-- src/records.rs; a replay returns the stored one, so the answer repeats), or
-- 'recover' with '' when the event is missing or was not checked against PostgreSQL
-- on this server process (`run` is not this server's run id; see src/recovery.rs).
-- 'recover' sells and records nothing.
--
-- Everything is checked before the first write: Redis does not undo a script's
-- earlier writes when a later command fails. After XADD, the first write, only HSET
-- on a hash and SET with a valid TTL follow, and neither can fail.

local quantity, ttl = tonumber(ARGV[1]), tonumber(ARGV[3])
if not quantity or quantity < 1 or quantity % 1 ~= 0 or #ARGV[2] ~= 32
    or not ttl or ttl < 1 or ttl % 1 ~= 0 or ttl > 1e12 then
  return redis.error_reply('ERR purchase.lua: bad arguments')
end

-- A record this Redis holds is the key's latest outcome, whatever the state of the
-- event: a newer one can only be written after it has expired.
local record = redis.call('GET', KEYS[2])
if record then
  return {'replay', record}
end

local inventory = redis.call('HMGET', KEYS[1], 'total', 'sold', 'purchases', 'rejected', 'run')
local total, sold = tonumber(inventory[1]), tonumber(inventory[2])
if not total or not sold or inventory[5] ~= server_run_id() then
  return {'recover', ''}
end

if sold + quantity > total then
  record = 'X' .. quantity
  redis.call('HSET', KEYS[1], 'rejected', (tonumber(inventory[4]) or 0) + 1)
  redis.call('SET', KEYS[2], record, 'EX', ttl)
  return {'new', record}
end

local now = redis.call('TIME')
local micros = now[1] .. string.sub('00000' .. now[2], -6)
local left = total - sold - quantity
redis.call('XADD', KEYS[3], '*', 'p', ARGV[2], 'k', ARGV[4], 'q', quantity, 'r', left, 't', micros)
redis.call('HSET', KEYS[1], 'sold', sold + quantity, 'purchases', (tonumber(inventory[3]) or 0) + 1)
record = 'S' .. quantity .. ':' .. left .. ':' .. ARGV[2]
redis.call('SET', KEYS[2], record, 'EX', ttl)
return {'new', record}
