-- The purchase gate: the only code that sells seats. One call decides a batch of
-- purchases of one event, in order, atomically (see src/batch.rs: the requests that
-- arrive while the event's previous call is in flight share the next one).
--
-- KEYS[1] inventory hash (total, sold, purchases, rejected, run)
-- KEYS[2] stream of sales, read by the consumer that writes PostgreSQL
-- KEYS[2 + i] idempotency record of the i-th purchase
-- ARGV[1] record TTL in seconds; then three per purchase i:
--   ARGV[3i - 1] quantity, ARGV[3i] purchase id (32 hex digits),
--   ARGV[3i + 1] the client's Idempotency-Key (carried to PostgreSQL)
--
-- Returns one string, a line per purchase in order: 'N' and the new record, 'R' and
-- the record replayed (formats in src/records.rs; a replay returns the stored one, so
-- the answer repeats), or 'C' alone when the event is missing or was not checked
-- against PostgreSQL on this server process (`run` is not this server's run id; see
-- src/recovery.rs). 'C' sells and records nothing. One string rather than an array
-- of them: the gate then parses and allocates one reply per call, not one per
-- purchase.
--
-- Each purchase is decided exactly as if it had its own call, in the order given: a
-- key repeated later in the batch replays what the earlier one got, and a refusal
-- (3 asked, 2 left) does not stop a later, smaller purchase from taking the seats.
--
-- Everything is checked and every record read before the first write: Redis does
-- not undo a script's earlier writes when a later command fails. After that only
-- SET with a valid TTL, XADD on a stream and HSET on a hash follow (the first
-- HMGET, on the first purchase that is not a replay, comes before them too), and
-- none of them can fail.

local ttl = tonumber(ARGV[1])
local n = #KEYS - 2
local valid = n >= 1 and #ARGV == 1 + 3 * n
    and ttl and ttl >= 1 and ttl % 1 == 0 and ttl <= 1e12
for i = 1, valid and n or 0 do
  local quantity = tonumber(ARGV[3 * i - 1])
  if not quantity or quantity < 1 or quantity % 1 ~= 0 or #ARGV[3 * i] ~= 32 then
    valid = false
  end
end
if not valid then
  return redis.error_reply('ERR purchase.lua: bad arguments')
end
local stream_type = redis.call('TYPE', KEYS[2])['ok']
if stream_type ~= 'stream' and stream_type ~= 'none' then
  return redis.error_reply('ERR purchase.lua: ' .. KEYS[2] .. ' is not a stream')
end

-- The event's counters, read once, on the first purchase that is not a replay.
local total, sold, purchases, rejected, on_sale
local function load_inventory()
  local inventory = redis.call('HMGET', KEYS[1], 'total', 'sold', 'purchases', 'rejected', 'run')
  total, sold = tonumber(inventory[1]), tonumber(inventory[2])
  purchases, rejected = tonumber(inventory[3]) or 0, tonumber(inventory[4]) or 0
  on_sale = total ~= nil and sold ~= nil and inventory[5] == server_run_id()
end

-- Every record is read before the first write; a key that comes again later in the
-- batch sees what its first occurrence got.
local stored = redis.call('MGET', unpack(KEYS, 3))
local decided = {}
local micros -- the time of the batch's sales, read once
local changed = false
local replies = {}
for i = 1, n do
  local key, quantity, id = KEYS[2 + i], tonumber(ARGV[3 * i - 1]), ARGV[3 * i]
  -- A record this Redis holds is the key's latest outcome, whatever the state of
  -- the event: a newer one can only be written after it has expired.
  local kind, record = 'R', decided[key] or stored[i]
  if not record then
    if on_sale == nil then
      load_inventory()
    end
    if not on_sale then
      kind, record = 'C', ''
    elseif sold + quantity > total then
      kind, record = 'N', 'X' .. quantity
      rejected = rejected + 1
    else
      if not micros then
        local now = redis.call('TIME')
        micros = now[1] .. string.sub('00000' .. now[2], -6)
      end
      sold, purchases = sold + quantity, purchases + 1
      local left = total - sold
      redis.call('XADD', KEYS[2], '*', 'p', id, 'k', ARGV[3 * i + 1], 'q', quantity, 'r', left, 't', micros)
      kind, record = 'N', 'S' .. quantity .. ':' .. left .. ':' .. id
    end
    if kind == 'N' then
      redis.call('SET', key, record, 'EX', ttl)
      decided[key] = record
      changed = true
    end
  end
  replies[i] = kind .. record
end
if changed then
  redis.call('HSET', KEYS[1], 'sold', sold, 'purchases', purchases, 'rejected', rejected)
end
return table.concat(replies, '\n')
