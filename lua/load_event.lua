-- Puts an event into Redis from PostgreSQL, safely when several replicas race.
--
-- KEYS[1] inventory hash, KEYS[2] stream of sales
-- ARGV[1] total seats, ARGV[2] seats sold per PostgreSQL, ARGV[3] consumer group
--
-- A missing inventory is created. An existing one is never lowered (Redis may hold
-- sales the consumer has not written yet) but is raised to what PostgreSQL holds: a
-- Redis restored from an older snapshot would otherwise sell those seats again.
-- Returns {created, raised_by}.

local persisted = tonumber(ARGV[2])
local created, raised = 0, 0
local sold = tonumber(redis.call('HGET', KEYS[1], 'sold'))
if not sold then
  redis.call('HSET', KEYS[1], 'total', ARGV[1], 'sold', persisted)
  created = 1
elseif sold < persisted then
  redis.call('HSET', KEYS[1], 'sold', persisted)
  raised = persisted - sold
end

-- Start at 0, not '$': entries already in the stream must still be persisted.
local ok = redis.pcall('XGROUP', 'CREATE', KEYS[2], ARGV[3], '0', 'MKSTREAM')
if type(ok) == 'table' and ok.err and not string.find(ok.err, 'BUSYGROUP') then
  return redis.error_reply(ok.err)
end
return {created, raised}
