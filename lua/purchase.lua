-- The purchase gate: the only code that changes inventory. Runs atomically.
--
-- KEYS[1] inventory hash (total, sold, purchases, rejected)
-- KEYS[2] idempotency record of this key
-- KEYS[3] stream of sales, read by the consumer that writes PostgreSQL
-- ARGV[1] quantity, ARGV[2] purchase id (UUID v7), ARGV[3] record TTL in seconds,
-- ARGV[4] the client's Idempotency-Key (carried to PostgreSQL)
--
-- Returns {kind, record}: kind is 'new', 'replay' or 'unknown' (event not in Redis).
-- A record is 'S<quantity>:<seats remaining>:<purchase id>' for a sale and
-- 'X<quantity>' for a refusal; replays return the stored one, so the answer repeats.
--
-- Everything is checked before the first write: Redis does not undo a script's
-- earlier writes when a later command fails.

local record = redis.call('GET', KEYS[2])
if record then
  return {'replay', record}
end

local inventory = redis.call('HMGET', KEYS[1], 'total', 'sold')
local total, sold = tonumber(inventory[1]), tonumber(inventory[2])
if not total or not sold then
  return {'unknown', ''}
end

local quantity = tonumber(ARGV[1])
if sold + quantity > total then
  record = 'X' .. quantity
  redis.call('SET', KEYS[2], record, 'EX', ARGV[3])
  redis.call('HINCRBY', KEYS[1], 'rejected', 1)
  return {'new', record}
end

local now = redis.call('TIME')
local micros = now[1] .. string.sub('00000' .. now[2], -6)
redis.call('XADD', KEYS[3], '*', 'p', ARGV[2], 'k', ARGV[4], 'q', quantity, 't', micros)
redis.call('HINCRBY', KEYS[1], 'sold', quantity)
redis.call('HINCRBY', KEYS[1], 'purchases', 1)
record = 'S' .. quantity .. ':' .. (total - sold - quantity) .. ':' .. ARGV[2]
redis.call('SET', KEYS[2], record, 'EX', ARGV[3])
return {'new', record}
