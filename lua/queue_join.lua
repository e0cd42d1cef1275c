-- A buyer joins an event's waiting room (src/queue/): one ticket per buyer, `p<n>`
-- for the n-th to join before the opening, `o<n>` after. Redis' clock alone decides
-- which side of the opening a join falls, so no `p` ticket is issued once it opened.
--
-- A late ticket gets its admission moment here, from Redis' clock, so that the rate
-- does not bank: `max(the previous place's moment + 1/rate, now)`. The previous
-- places form a chain from `base` (the opening, or the join that found nobody
-- waiting): its `count`-th place is admitted at `base + ceil(count × 1000 / rate)`,
-- the same formula as the early places' from the opening, so the first late place
-- follows the last early one.
--
-- KEYS[1] the room (hash: opens, rate, admission, seed; early and late counters; the
--         chain's base (ms) and count)
-- KEYS[2] tickets by buyer (hash: '<ticket>@<joined at, ms>', and for late tickets
--         '@<admitted at, ms>')
-- KEYS[3] when each buyer was first told of their admission (hash)
-- ARGV[1] the buyer, ARGV[2] a spent ticket (its admission expired unused) to give
-- up and join again, at the back, if the buyer still holds it ('' for none: two
-- such joins at once give up the one ticket once)
-- Returns {} when the room is missing (recover the event first), else {ticket,
-- opens, rate, admission, seed, early, late, now (ms), admitted at (ms, '' for an
-- early ticket)}.

local room = redis.call('HMGET', KEYS[1], 'opens', 'rate', 'admission', 'seed', 'early', 'base', 'count')
local opens, rate = tonumber(room[1]), tonumber(room[2])
if not opens or not rate or rate < 1 or not room[4] then
  return {}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local held = redis.call('HGET', KEYS[2], ARGV[1])
if held and ARGV[2] ~= '' and string.match(held, '^[^@]+') == ARGV[2] then
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('HDEL', KEYS[3], ARGV[1])
  held = false
end
local ticket, admitted_at
if held then
  ticket = string.match(held, '^[^@]+')
  admitted_at = string.match(held, '^[^@]+@[^@]+@(%d+)$') or ''
elseif now < opens then
  ticket = 'p' .. redis.call('HINCRBY', KEYS[1], 'early', 1)
  admitted_at = ''
  redis.call('HSET', KEYS[2], ARGV[1], ticket .. '@' .. string.format('%d', now))
else
  local base = tonumber(room[6]) or opens
  local count = tonumber(room[7]) or tonumber(room[5]) or 0
  local at = base + math.ceil((count + 1) * 1000 / rate)
  if at >= now then
    count = count + 1
  else
    base, count, at = now, 0, now
  end
  ticket = 'o' .. redis.call('HINCRBY', KEYS[1], 'late', 1)
  admitted_at = string.format('%d', at)
  redis.call('HSET', KEYS[1], 'base', string.format('%d', base), 'count', count)
  redis.call('HSET', KEYS[2], ARGV[1], ticket .. '@' .. string.format('%d', now) .. '@' .. admitted_at)
end
local counts = redis.call('HMGET', KEYS[1], 'early', 'late', 'base', 'count')
return {ticket, room[1], room[2], room[3], room[4], counts[1] or '0', counts[2] or '0',
  string.format('%d', now), admitted_at, counts[3] or '', counts[4] or ''}
