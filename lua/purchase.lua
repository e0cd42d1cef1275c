-- The gate: the only code that moves seats. One call decides a batch of requests of
-- one event, in order, atomically (see src/batch.rs: the requests that arrive while
-- the event's previous call is in flight share the next one). A request is a
-- purchase, a hold, the confirmation or release of a hold, or the cancellation of a
-- sale; before any of them, the call returns up to EXPIRE_PER_CALL holds of the event
-- that expired (a call with no request does only that: the sweeper's call).
--
-- KEYS[1] inventory hash: total, sold, held, purchases, rejected, run, and the
--         event's settings limit (seats per buyer; absent: none), hold (seconds) and
--         queued ('1' when buyers must be admitted from its waiting room)
-- KEYS[2] stream of sales and cancellations, read by the consumer into PostgreSQL
-- KEYS[3] holds of the event that still hold seats: sorted set, member
--         '<hold id>:<quantity>:<buyer>', score the expiry in Unix milliseconds
-- KEYS[4] seats sold or held per buyer (hash; kept only when the event has a limit)
-- then each request's keys, in request order
-- ARGV[1] idempotency record TTL in seconds; then each request's arguments:
--
--   op        ARGV                                   KEYS
--   purchase  'P'..quantity, id, client key, buyer, admitted    idempotency record
--   hold      'H'..quantity, id, client key, buyer, admitted    idempotency record, hold hash
--   confirm   'C', hold id                           hold hash
--   release   'D', hold id                           hold hash
--   cancel    'K'..quantity, purchase id, buyer        cancellation marker
--
-- Ids are 32 hex digits; buyer is '' when the request carries no verified buyer;
-- admitted is '1' when it carries a valid admission token for that buyer.
--
-- Returns one string, a line per request in order (formats of records in
-- src/records.rs):
--   purchase, hold: 'N' and the new record, 'R' and the record replayed, 'A' when the
--                   event is queued and the request was not admitted, 'T' when the
--                   event has a limit and no buyer was given (nothing recorded)
--   confirm:        'N' or 'R' and the sale's record, 'E' and 'expired' or
--                   'released', 'G' when there is no such hold
--   release:        'N', 'R' and the state it already had, 'F' when it was
--                   confirmed, 'G'
--   cancel:         'N' and the cancellation time (Unix microseconds), 'R'
--   any of them:    'C' alone when the event is missing or was not checked against
--                   PostgreSQL on this server process (`run` is not this server's run
--                   id; see src/recovery.rs): nothing was done.
-- A call with no request returns how many expired holds it returned.
--
-- Each request is decided exactly as if it had its own call, in the order given: a
-- key repeated later in the batch replays what the earlier one got; a refusal (3
-- asked, 2 left) does not stop a later, smaller purchase.
--
-- Invariants after every call: sold + held <= total; a hold moves only forward
-- (held -> confirmed | released | expired); a buyer's seats never exceed the limit.
-- A hold's seats are returned exactly once, by whichever call removes its member
-- from KEYS[3]; a hold whose member is gone is never confirmed. 'expired' is not
-- written into the hold hash when the sweep returns it (its name is not in KEYS):
-- a hold still 'held' past its expiry reads as expired.
--
-- Everything is checked and read before the first write: Redis does not undo a
-- script's earlier writes when a later command fails. The writes are then SET with a
-- valid TTL, XADD on a stream, HSET on hashes, ZADD/ZREM on the sorted set and
-- PEXPIREAT, none of which can fail on keys of the checked types.

local EXPIRE_PER_CALL = 100
local DEFAULT_HOLD_SECONDS = 600

local ttl = tonumber(ARGV[1])
local valid = ttl and ttl >= 1 and ttl % 1 == 0 and ttl <= 1e12
-- The requests, parsed: op, quantity, id, client key, buyer, and their key names.
local requests = {}
local k, a = 5, 2
local key_count = { P = 1, H = 2, C = 1, D = 1, K = 1 }
local arg_count = { P = 5, H = 5, C = 2, D = 2, K = 3 }
while valid and a <= #ARGV do
  local head = ARGV[a]
  local op = string.sub(head, 1, 1)
  local r = { op = op, quantity = tonumber(string.sub(head, 2)), id = ARGV[a + 1] }
  if not key_count[op] or a + arg_count[op] - 1 > #ARGV or #r.id ~= 32 then
    valid = false
    break
  end
  if op == 'P' or op == 'H' or op == 'K' then
    if not r.quantity or r.quantity < 1 or r.quantity % 1 ~= 0 then
      valid = false
      break
    end
  end
  if op == 'P' or op == 'H' then
    r.client_key, r.buyer, r.admitted = ARGV[a + 2], ARGV[a + 3], ARGV[a + 4] == '1'
  elseif op == 'K' then
    r.buyer = ARGV[a + 2]
  end
  r.key, r.hold_key = KEYS[k], KEYS[k + 1]
  k, a = k + key_count[op], a + arg_count[op]
  requests[#requests + 1] = r
end
if not valid or k - 1 ~= #KEYS then
  return redis.error_reply('ERR purchase.lua: bad arguments')
end
local function check_type(key, expected)
  local t = redis.call('TYPE', key)['ok']
  if t ~= expected and t ~= 'none' then
    error({ err = 'ERR purchase.lua: ' .. key .. ' is not a ' .. expected })
  end
end
check_type(KEYS[2], 'stream')
check_type(KEYS[3], 'zset')

local inventory = redis.call('HMGET', KEYS[1], 'total', 'sold', 'held', 'purchases', 'rejected', 'run',
  'limit', 'hold', 'queued')
local total, sold = tonumber(inventory[1]), tonumber(inventory[2])
local held, purchases, rejected = tonumber(inventory[3]) or 0, tonumber(inventory[4]) or 0,
    tonumber(inventory[5]) or 0
local limit = tonumber(inventory[7])
local queued = inventory[9] == '1'
local hold_ms = (tonumber(inventory[8]) or DEFAULT_HOLD_SECONDS) * 1000
local exists = total ~= nil and sold ~= nil
if limit then
  check_type(KEYS[4], 'hash')
end
local on_sale -- read on the first request that needs it: INFO costs 2 µs
local function is_on_sale()
  if on_sale == nil then
    on_sale = exists and inventory[6] == server_run_id()
  end
  return on_sale
end

-- Reads: the idempotency records, the holds and the cancellation markers.
local record_keys = {}
for _, r in ipairs(requests) do
  if r.op == 'P' or r.op == 'H' then
    record_keys[#record_keys + 1] = r.key
  end
end
local stored = {}
if #record_keys > 0 then
  local values = redis.call('MGET', unpack(record_keys))
  for i, key in ipairs(record_keys) do
    stored[key] = values[i] or nil
  end
end
local holds = {} -- hold hash name -> its fields, kept up to date through the batch
for _, r in ipairs(requests) do
  if (r.op == 'C' or r.op == 'D') and not holds[r.key] then
    local f = redis.call('HMGET', r.key, 's', 'q', 'b', 'k', 'x', 'r')
    holds[r.key] = f[1] and { s = f[1], q = tonumber(f[2]), b = f[3], k = f[4], x = tonumber(f[5]),
      r = f[6] } or false
  elseif r.op == 'K' and stored[r.key] == nil then
    stored[r.key] = redis.call('GET', r.key) or nil
  end
end

local now_ms, micros
local function now()
  if not now_ms then
    local t = redis.call('TIME')
    micros = t[1] .. string.sub('00000' .. t[2], -6)
    now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return now_ms
end

local buyers, dirty_buyers = {}, {}
local function buyer_seats(buyer)
  if buyers[buyer] == nil then
    buyers[buyer] = tonumber(redis.call('HGET', KEYS[4], buyer)) or 0
  end
  return buyers[buyer]
end
local function add_buyer_seats(buyer, seats)
  if limit and buyer ~= '' then
    buyers[buyer] = buyer_seats(buyer) + seats
    dirty_buyers[buyer] = true
  end
end

local changed = false
-- Returns the seats of the hold behind `member` (removed from KEYS[3] by the
-- caller) to stock and to its buyer.
local function return_hold(member)
  local _, _, quantity, buyer = string.find(member, '^[^:]+:(%d+):(.*)$')
  quantity = tonumber(quantity) or 0
  held = held - quantity
  add_buyer_seats(buyer or '', -quantity)
  changed = true
end

-- Expired holds first: their seats are on sale again for every request below.
local expired = {}
if exists and held > 0 then
  expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now(), 'LIMIT', 0, EXPIRE_PER_CALL)
  for _, member in ipairs(expired) do
    redis.call('ZREM', KEYS[3], member)
    return_hold(member)
  end
end

local function member_of(r, hold)
  return r.id .. ':' .. hold.q .. ':' .. hold.b
end

-- A hold still 'held': removes its member, and answers whether it was still there
-- (if not, a sweep returned its seats already).
local function take_member(r, hold)
  return redis.call('ZREM', KEYS[3], member_of(r, hold)) == 1
end

local function seats_or_buy(r, kind)
  local quantity, buyer = r.quantity, r.buyer
  if sold + held + quantity > total then
    rejected = rejected + 1
    return kind .. 'X' .. quantity
  end
  if limit and buyer_seats(buyer) + quantity > limit then
    rejected = rejected + 1
    return kind .. 'L' .. quantity
  end
  add_buyer_seats(buyer, quantity)
  return nil
end

local replies = {}
for i, r in ipairs(requests) do
  local reply
  local op = r.op
  if op == 'P' or op == 'H' then
    local record = stored[r.key]
    if record then
      reply = 'R' .. record
    elseif not is_on_sale() then
      reply = 'C'
    elseif queued and not r.admitted then
      reply = 'A'
    elseif limit and r.buyer == '' then
      reply = 'T'
    else
      local prefix = op == 'H' and 'H' or ''
      record = seats_or_buy(r, prefix)
      if not record and op == 'P' then
        now()
        sold, purchases = sold + r.quantity, purchases + 1
        local left = total - sold - held
        if r.buyer ~= '' then
          redis.call('XADD', KEYS[2], '*', 'p', r.id, 'k', r.client_key, 'q', r.quantity, 'r', left,
            't', micros, 'b', r.buyer)
        else
          redis.call('XADD', KEYS[2], '*', 'p', r.id, 'k', r.client_key, 'q', r.quantity, 'r', left,
            't', micros)
        end
        record = 'S' .. r.quantity .. ':' .. left .. ':' .. r.id
      elseif not record then
        local expires = now() + hold_ms
        held = held + r.quantity
        local left = total - sold - held
        redis.call('HSET', r.hold_key, 's', 'held', 'q', r.quantity, 'b', r.buyer, 'k', r.client_key,
          'x', expires, 'c', now_ms)
        redis.call('PEXPIREAT', r.hold_key, expires + ttl * 1000)
        redis.call('ZADD', KEYS[3], expires, r.id .. ':' .. r.quantity .. ':' .. r.buyer)
        holds[r.hold_key] = { s = 'held', q = r.quantity, b = r.buyer, k = r.client_key, x = expires }
        record = 'H' .. r.quantity .. ':' .. left .. ':' .. r.id .. ':' .. expires
      end
      redis.call('SET', r.key, record, 'EX', ttl)
      stored[r.key] = record
      changed = true
      reply = 'N' .. record
    end
  elseif op == 'C' or op == 'D' then
    local hold = holds[r.key]
    if not hold then
      reply = 'G'
    elseif hold.s == 'confirmed' then
      reply = op == 'C' and ('RS' .. hold.q .. ':' .. hold.r .. ':' .. r.id) or 'F'
    elseif hold.s ~= 'held' then
      reply = (op == 'C' and 'E' or 'R') .. hold.s
    elseif op == 'C' and not is_on_sale() then
      reply = 'C'
    else
      -- Past its expiry the hold is expired, whether or not a sweep returned it yet;
      -- before, it is still held only if no sweep took it (a clock that stepped back).
      local present = take_member(r, hold)
      if present then
        held = held - hold.q
        changed = true
      end
      if now() >= hold.x or not present then
        if present then
          add_buyer_seats(hold.b, -hold.q)
        end
        hold.s = 'expired'
        redis.call('HSET', r.key, 's', 'expired', 'e', math.min(hold.x, now_ms))
        reply = (op == 'C' and 'E' or 'R') .. 'expired'
      elseif op == 'D' then
        add_buyer_seats(hold.b, -hold.q)
        hold.s = 'released'
        redis.call('HSET', r.key, 's', 'released', 'e', now_ms)
        reply = 'N'
      else
        sold, purchases = sold + hold.q, purchases + 1
        local left = total - sold - held
        if hold.b ~= '' then
          redis.call('XADD', KEYS[2], '*', 'p', r.id, 'k', hold.k, 'q', hold.q, 'r', left, 't', micros,
            'h', '1', 'b', hold.b)
        else
          redis.call('XADD', KEYS[2], '*', 'p', r.id, 'k', hold.k, 'q', hold.q, 'r', left, 't', micros,
            'h', '1')
        end
        hold.s, hold.r = 'confirmed', left
        redis.call('HSET', r.key, 's', 'confirmed', 'r', left, 'e', now_ms)
        reply = 'NS' .. hold.q .. ':' .. left .. ':' .. r.id
      end
    end
  else -- 'K'
    if stored[r.key] then
      reply = 'R' .. stored[r.key]
    elseif not is_on_sale() then
      reply = 'C'
    else
      now()
      sold = sold - r.quantity
      add_buyer_seats(r.buyer, -r.quantity)
      if r.buyer ~= '' then
        redis.call('XADD', KEYS[2], '*', 'p', r.id, 'q', r.quantity, 'c', micros, 'b', r.buyer)
      else
        redis.call('XADD', KEYS[2], '*', 'p', r.id, 'q', r.quantity, 'c', micros)
      end
      redis.call('SET', r.key, micros, 'EX', ttl)
      stored[r.key] = micros
      changed = true
      reply = 'N' .. micros
    end
  end
  replies[i] = reply
end

if changed then
  redis.call('HSET', KEYS[1], 'sold', sold, 'held', held, 'purchases', purchases, 'rejected', rejected)
end
for buyer in pairs(dirty_buyers) do
  if buyers[buyer] > 0 then
    redis.call('HSET', KEYS[4], buyer, buyers[buyer])
  else
    redis.call('HDEL', KEYS[4], buyer)
  end
end
if #requests == 0 then
  return tostring(#expired)
end
return table.concat(replies, '\n')
