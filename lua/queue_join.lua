-- A buyer joins an event's waiting room (src/queue.rs): one ticket per buyer, `p<n>`
-- for the n-th to join before the opening, `o<n>` after. Redis' clock alone decides
-- which side of the opening a join falls, so no `p` ticket is issued once it opened.
--
-- KEYS[1] the room (hash: opens, rate, admission, seed; early and late counters)
-- KEYS[2] tickets by buyer (hash: '<ticket>@<joined at, ms>')
-- ARGV[1] the buyer
-- Returns {} when the room is missing (recover the event first), else {ticket,
-- opens, rate, admission, seed, early, late, now (ms)}.

local room = redis.call('HMGET', KEYS[1], 'opens', 'rate', 'admission', 'seed')
if not room[1] or not room[4] then
  return {}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ticket = redis.call('HGET', KEYS[2], ARGV[1])
if not ticket then
  if now < tonumber(room[1]) then
    ticket = 'p' .. redis.call('HINCRBY', KEYS[1], 'early', 1)
  else
    ticket = 'o' .. redis.call('HINCRBY', KEYS[1], 'late', 1)
  end
  redis.call('HSET', KEYS[2], ARGV[1], ticket .. '@' .. string.format('%d', now))
else
  ticket = string.match(ticket, '^[^@]+')
end
local counts = redis.call('HMGET', KEYS[1], 'early', 'late')
return {ticket, room[1], room[2], room[3], room[4], counts[1] or '0', counts[2] or '0',
  string.format('%d', now)}
