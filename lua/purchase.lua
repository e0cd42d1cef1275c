-- The gate: the only code that moves seats. One call decides a batch of requests of
-- one event, in order, atomically (see src/gate/batch.rs: the requests that arrive while
-- the event's previous call is in flight share the next one). A request is a
-- purchase, a hold, the confirmation or release of a hold, or the cancellation of a
-- sale; before any of them, the call returns up to EXPIRE_PER_CALL holds of the event
-- that expired (a call with no request does only that: the sweeper's call).
--
-- KEYS[1] inventory hash: total, sold, held, purchases, rejected, run, and the
--         event's settings limit (seats per buyer; absent: none), hold (seconds) and
--         queued ('1' when buyers must be admitted from its waiting room)
-- KEYS[2] stream of the seat movements PostgreSQL must hold (src/records.rs): sales,
--         cancellations, holds made and released, read by the consumer
-- KEYS[3] holds of the event that still hold seats: sorted set, member
--         '<hold id>:<quantity>:<buyer>', score the expiry in Unix milliseconds
-- KEYS[4] seats sold or held per buyer (hash; kept only when the event has a limit)
-- then each request's keys, in request order
-- ARGV[1] idempotency record TTL in seconds; ARGV[2] seconds a hold that ended
--         without a sale keeps its hash and record (at most ARGV[1]; see Retention in
--         src/gate/retention.rs); then each request's arguments:
--
--   op        ARGV                                                 KEYS
--   purchase  'P'..quantity, id, client key, buyer, admitted       idempotency record
--   hold      'H'..quantity, id, client key, buyer, admitted       idempotency record, hold hash
--   confirm   'C', hold id, client key of the hold                 hold hash, its idempotency record
--   release   'D', hold id, client key of the hold                 hold hash, its idempotency record
--   cancel    'K'..quantity, purchase id, buyer                    cancellation marker
--
-- Ids are 32 hex digits; buyer is '' when the request carries no verified buyer;
-- admitted is '1' when it carries a valid admission token for that buyer. A confirm
-- or release names the hold's request key as the caller read it from the hold hash
-- ('' when there was none), so that the script writes only keys it is given.
--
-- Returns one string, a line per request in order (formats of records in
-- src/records.rs):
--   purchase, hold: 'N' and the new record, 'R' and the record replayed, 'A' when the
--                   event is queued and the request was not admitted, 'T' when the
--                   event has a limit and no buyer was given; a refusal ('N' and 'X'
--                   or 'L', 'HX', 'HL') is answered but not recorded
--   confirm:        'N' or 'R' and the sale's record, 'E' and 'expired' or
--                   'released', 'G' when there is no such hold
--   release:        'N', 'R' and the state it already had, 'F' when it was
--                   confirmed, 'G'
--   confirm, release: 'W' when the hold's request key is not the one given (the
--                   hold came back since the caller read it): nothing was done
--   cancel:         'N' and the cancellation time (Unix microseconds), 'R'
--   any of them:    'C' alone when the event is missing or was not checked against
--                   PostgreSQL on this server process (`run` is not this server's run
--                   id; see src/gate/recovery): nothing was done; 'Z' alone when doing it
--                   would break an invariant below (counters that recovery should
--                   have set right): nothing was done.
-- A call with no request returns how many expired holds it returned (none while the
-- event is not on sale).
--
-- Each request is decided exactly as if it had its own call, in the order given: a
-- key repeated later in the batch replays the sale or hold the earlier one got (a
-- refused key is decided again); a refusal (3 asked, 2 left) does not stop a later,
-- smaller purchase.
--
-- Invariants after every call: sold + held <= total, checked wherever either grows;
-- a hold moves only forward (held -> confirmed | released | expired); a buyer's
-- seats never exceed the limit. A hold's seats are returned exactly once, by
-- whichever call removes its member from KEYS[3]; a hold whose member is gone is
-- never confirmed. 'expired' is not written into the hold hash when the sweep
-- returns it (its name is not in KEYS): a hold still 'held' past its expiry reads as
-- expired, and its expiry is not logged (its time says it).
--
-- Everything is checked and read before the first write of each request: Redis does
-- not undo a script's earlier writes when a later command fails. The writes are SET
-- with a valid TTL, XADD on a stream, HSET on hashes, ZADD/ZREM on the sorted set and
-- PEXPIREAT, none of which can fail on keys of the checked types.

local EXPIRE_PER_CALL = 100
local DEFAULT_HOLD_SECONDS = 600

-- Arguments ------------------------------------------------------------------------

local ttl, ended_ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
local valid = ttl and ttl >= 1 and ttl % 1 == 0 and ttl <= 1e12
  and ended_ttl and ended_ttl >= 1 and ended_ttl % 1 == 0 and ended_ttl <= ttl
local KEY_COUNT = { P = 1, H = 2, C = 2, D = 2, K = 1 }
local ARG_COUNT = { P = 5, H = 5, C = 3, D = 3, K = 3 }
local COUNTED = { P = true, H = true, K = true }

local function parse_request(a, k)
  local op = string.sub(ARGV[a], 1, 1)
  if not KEY_COUNT[op] or a + ARG_COUNT[op] - 1 > #ARGV or #ARGV[a + 1] ~= 32 then
    return nil
  end
  local r = { op = op, quantity = tonumber(string.sub(ARGV[a], 2)), id = ARGV[a + 1],
    key = KEYS[k], hold_key = KEYS[k + 1] }
  if COUNTED[op] and not (r.quantity and r.quantity >= 1 and r.quantity % 1 == 0) then
    return nil
  end
  if op == 'P' or op == 'H' then
    r.client_key, r.buyer, r.admitted = ARGV[a + 2], ARGV[a + 3], ARGV[a + 4] == '1'
  elseif op == 'K' then
    r.buyer = ARGV[a + 2]
  else
    r.client_key, r.record_key = ARGV[a + 2], KEYS[k + 1]
  end
  return r, a + ARG_COUNT[op], k + KEY_COUNT[op]
end

local requests = {}
local a, k = 3, 5
while valid and a <= #ARGV do
  local r
  r, a, k = parse_request(a, k)
  if not r then
    valid = false
  else
    requests[#requests + 1] = r
  end
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
for _, r in ipairs(requests) do
  if r.op == 'H' then
    check_type(r.hold_key, 'hash')
  end
end

-- State, read once ------------------------------------------------------------------

local inv = redis.call('HMGET', KEYS[1], 'total', 'sold', 'held', 'purchases', 'rejected', 'run',
  'limit', 'hold', 'queued')
local total, sold = tonumber(inv[1]), tonumber(inv[2])
local held, purchases, rejected = tonumber(inv[3]) or 0, tonumber(inv[4]) or 0, tonumber(inv[5]) or 0
local limit = tonumber(inv[7])
local hold_ms = (tonumber(inv[8]) or DEFAULT_HOLD_SECONDS) * 1000
local queued = inv[9] == '1'
local exists = total ~= nil and sold ~= nil
if limit then
  check_type(KEYS[4], 'hash')
end
local on_sale -- read on the first request that needs it: INFO costs 2 µs
local function is_on_sale()
  if on_sale == nil then
    on_sale = exists and inv[6] == server_run_id()
  end
  return on_sale
end

-- Records under the requests' keys (MGET at once) and cancellation markers.
local stored = {}
local record_keys = {}
for _, r in ipairs(requests) do
  if r.op == 'P' or r.op == 'H' then
    record_keys[#record_keys + 1] = r.key
  end
end
if #record_keys > 0 then
  local values = redis.call('MGET', unpack(record_keys))
  for i, key in ipairs(record_keys) do
    stored[key] = values[i] or nil
  end
end
-- Holds asked about, by hash name; kept up to date through the batch.
local holds = {}
for _, r in ipairs(requests) do
  if (r.op == 'C' or r.op == 'D') and holds[r.key] == nil then
    local f = redis.call('HMGET', r.key, 's', 'q', 'b', 'k', 'x', 'r', 'l', 'c')
    holds[r.key] = f[1] and { s = f[1], q = tonumber(f[2]), b = f[3], k = f[4], x = tonumber(f[5]),
      r = f[6], l = f[7], c = f[8] } or false
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

-- Helpers --------------------------------------------------------------------------

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

-- Appends a seat movement to the stream: `fields` as src/records.rs reads them,
-- with the buyer when there is one.
local function append(fields, buyer)
  if buyer ~= '' then
    fields[#fields + 1] = 'b'
    fields[#fields + 1] = buyer
  end
  redis.call('XADD', KEYS[2], '*', unpack(fields))
  changed = true
end

-- Adds to `fields` what made `hold` (seats left after it, expiry, when), under
-- names of their own: a release or confirmation carries its hold, so that PostgreSQL
-- gets the hold whichever entry a consumer writes first (two consumers may write
-- them in either order, and one may be lost with Redis' data after the other).
local function with_hold(fields, hold)
  if hold and hold.l and hold.c then
    for _, field in ipairs({ 'hl', hold.l, 'hx', hold.x, 'hm', hold.c .. '000' }) do
      fields[#fields + 1] = field
    end
  end
  return fields
end

local function append_sale(id, client_key, quantity, left, buyer, hold)
  local fields = { 'p', id, 'k', client_key, 'q', quantity, 'r', left, 't', micros }
  if hold then
    fields[#fields + 1] = 'h'
    fields[#fields + 1] = '1'
  end
  append(with_hold(fields, hold), buyer)
end

local function member_of(id, quantity, buyer)
  return id .. ':' .. quantity .. ':' .. buyer
end

-- Returns the seats of the hold behind `member` (removed from KEYS[3] by the caller)
-- to stock and to its buyer.
local function return_hold(member)
  local _, _, quantity, buyer = string.find(member, '^[^:]+:(%d+):(.*)$')
  quantity = tonumber(quantity) or 0
  held = held - quantity
  add_buyer_seats(buyer or '', -quantity)
  changed = true
end

-- The refusal record of a purchase or hold ('X' no seats, 'L' over the limit), or
-- nil when `quantity` seats may go to `buyer`.
local function refusal(r, prefix)
  if sold + held + r.quantity > total then
    return prefix .. 'X' .. r.quantity
  end
  if limit and buyer_seats(r.buyer) + r.quantity > limit then
    return prefix .. 'L' .. r.quantity
  end
  return nil
end

-- A hold's hash and its request's record live together, until `seconds` after `ms`:
-- its expiry while it may still be confirmed or has ended without a sale, its
-- release, or its confirmation, which makes it a sale kept for the idempotency TTL.
-- The same rule as RebuiltHold::kept_until_ms (src/gate/recovery/ledger/holds.rs).
local function kept_until(ms, seconds)
  return ms + seconds * 1000
end

-- Sets when the hold of a confirm or release, and its request's record, expire.
local function keep_hold(r, until_ms)
  redis.call('PEXPIREAT', r.key, until_ms)
  redis.call('PEXPIREAT', r.record_key, until_ms)
end

-- Operations: each returns its reply line -------------------------------------------

local function purchase_or_hold(r)
  local record = stored[r.key]
  -- A sale or hold recorded is final. A refusal is not recorded (one written before
  -- this rule, 'X', 'L', 'HX' or 'HL', reads as none): it sold nothing, so the key is
  -- decided anew, and a flood of refused requests leaves nothing behind.
  if record and not string.find(record, '^H?[XL]') then
    return 'R' .. record
  elseif not is_on_sale() then
    return 'C'
  elseif queued and not r.admitted then
    return 'A'
  elseif limit and r.buyer == '' then
    return 'T'
  end
  record = refusal(r, r.op == 'H' and 'H' or '')
  if record then
    rejected = rejected + 1
    changed = true
    return 'N' .. record
  elseif r.op == 'P' then
    now()
    sold, purchases = sold + r.quantity, purchases + 1
    add_buyer_seats(r.buyer, r.quantity)
    local left = total - sold - held
    append_sale(r.id, r.client_key, r.quantity, left, r.buyer, nil)
    record = 'S' .. r.quantity .. ':' .. left .. ':' .. r.id
  else
    local expires = now() + hold_ms
    held = held + r.quantity
    add_buyer_seats(r.buyer, r.quantity)
    local left = total - sold - held
    redis.call('HSET', r.hold_key, 's', 'held', 'q', r.quantity, 'b', r.buyer, 'k', r.client_key,
      'x', expires, 'c', now_ms, 'l', left)
    redis.call('PEXPIREAT', r.hold_key, kept_until(expires, ended_ttl))
    redis.call('ZADD', KEYS[3], expires, member_of(r.id, r.quantity, r.buyer))
    append({ 'p', r.id, 'k', r.client_key, 'q', r.quantity, 'r', left, 'x', expires, 'm', micros },
      r.buyer)
    holds[r.hold_key] = { s = 'held', q = r.quantity, b = r.buyer, k = r.client_key, x = expires,
      l = left, c = now_ms }
    record = 'H' .. r.quantity .. ':' .. left .. ':' .. r.id .. ':' .. expires
  end
  if r.op == 'P' then
    redis.call('SET', r.key, record, 'EX', ttl)
  else
    redis.call('SET', r.key, record, 'PXAT', kept_until(now_ms + hold_ms, ended_ttl))
  end
  stored[r.key] = record
  changed = true
  return 'N' .. record
end

-- A hold that is no longer 'held' answers what it came to.
local function ended_hold(r, hold)
  if hold.s == 'confirmed' then
    return r.op == 'C' and ('RS' .. hold.q .. ':' .. hold.r .. ':' .. r.id) or 'F'
  end
  return (r.op == 'C' and 'E' or 'R') .. hold.s
end

-- Confirm or release a hold still 'held'. Past its expiry it is expired, whether or
-- not a sweep returned it yet; before, it is still held only if no sweep took its
-- member (a clock that stepped back).
local function confirm_or_release(r)
  local hold = holds[r.key]
  -- An ended hold is final; a missing or held one may be older than PostgreSQL.
  if (not hold or hold.s == 'held') and not is_on_sale() then
    return 'C'
  elseif not hold then
    return 'G'
  elseif (hold.k or '') ~= r.client_key then
    return 'W'
  elseif hold.s ~= 'held' then
    return ended_hold(r, hold)
  end
  local member = member_of(r.id, hold.q, hold.b)
  local present = redis.call('ZSCORE', KEYS[3], member) ~= false
  if now() >= hold.x or not present then
    if present then
      redis.call('ZREM', KEYS[3], member)
      return_hold(member)
    end
    hold.s = 'expired'
    redis.call('HSET', r.key, 's', 'expired', 'e', math.min(hold.x, now_ms))
    return (r.op == 'C' and 'E' or 'R') .. 'expired'
  end
  if r.op == 'C' and sold + held > total then
    return 'Z' -- the hold's seats moving to `sold` would not fit
  end
  redis.call('ZREM', KEYS[3], member)
  held = held - hold.q
  if r.op == 'D' then
    add_buyer_seats(hold.b, -hold.q)
    hold.s = 'released'
    redis.call('HSET', r.key, 's', 'released', 'e', now_ms)
    keep_hold(r, kept_until(now_ms, ended_ttl))
    append(with_hold({ 'p', r.id, 'q', hold.q, 'd', micros, 'k', hold.k }, hold), hold.b)
    return 'N'
  end
  sold, purchases = sold + hold.q, purchases + 1
  local left = total - sold - held
  append_sale(r.id, hold.k, hold.q, left, hold.b, hold)
  hold.s, hold.r = 'confirmed', left
  redis.call('HSET', r.key, 's', 'confirmed', 'r', left, 'e', now_ms)
  keep_hold(r, math.max(kept_until(now_ms, ttl), kept_until(hold.x, ended_ttl)))
  return 'NS' .. hold.q .. ':' .. left .. ':' .. r.id
end

local function cancel(r)
  if stored[r.key] then
    return 'R' .. stored[r.key]
  elseif not is_on_sale() then
    return 'C'
  elseif sold < r.quantity then
    return 'Z' -- `sold` does not count the sale
  end
  now()
  sold = sold - r.quantity
  add_buyer_seats(r.buyer, -r.quantity)
  append({ 'p', r.id, 'q', r.quantity, 'c', micros }, r.buyer)
  redis.call('SET', r.key, micros, 'EX', ttl)
  stored[r.key] = micros
  return 'N' .. micros
end

local OPERATIONS = { P = purchase_or_hold, H = purchase_or_hold, C = confirm_or_release,
  D = confirm_or_release, K = cancel }

-- The call ----------------------------------------------------------------------------

-- Expired holds first: their seats are on sale again for every request below. Only
-- on an event checked on this server: elsewhere the holds may not be what they seem.
local expired = {}
if exists and held > 0 and is_on_sale() then
  expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now(), 'LIMIT', 0, EXPIRE_PER_CALL)
  for _, member in ipairs(expired) do
    redis.call('ZREM', KEYS[3], member)
    return_hold(member)
  end
end

local replies = {}
for i, r in ipairs(requests) do
  replies[i] = OPERATIONS[r.op](r)
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
