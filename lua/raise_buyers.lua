-- Raises buyers' seat counts to what PostgreSQL and the stream hold for certain
-- (src/recovery.rs), never lowering one: a count Redis kept may include holds.
--
-- KEYS[1] seats per buyer (hash)
-- ARGV pairs: buyer, seats
-- Returns how many counts were raised.

local raised = 0
for i = 1, #ARGV, 2 do
  local have = tonumber(redis.call('HGET', KEYS[1], ARGV[i])) or 0
  if have < tonumber(ARGV[i + 1]) then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
    raised = raised + 1
  end
end
return raised
