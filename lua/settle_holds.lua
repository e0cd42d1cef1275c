-- Marks confirmed the holds PostgreSQL has a sale for, though this Redis still has
-- them held: Redis came back from a file older than their confirmation
-- (src/recovery.rs, while the event is off sale and after `sold` was raised to
-- count those sales). Their seats leave `held`, so they are not counted twice, and
-- a repeated confirmation replays the sale instead of making another.
--
-- KEYS[1] inventory hash, KEYS[2] holds sorted set, then one hold hash per hold
-- ARGV per hold, three each: its member in KEYS[2], seats left after its sale, the
-- sale's time (Unix ms)
-- Returns how many holds it settled.

local settled, returned = 0, 0
for i = 1, #KEYS - 2 do
  local member = ARGV[3 * i - 2]
  if redis.call('ZREM', KEYS[2], member) == 1 then
    local _, _, quantity = string.find(member, '^[^:]+:(%d+):')
    returned = returned + (tonumber(quantity) or 0)
    redis.call('HSET', KEYS[2 + i], 's', 'confirmed', 'r', ARGV[3 * i - 1], 'e', ARGV[3 * i])
    settled = settled + 1
  end
end
if returned > 0 then
  redis.call('HINCRBY', KEYS[1], 'held', -returned)
end
return settled
