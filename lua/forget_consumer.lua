-- Removes a consumer from a stream's group, but only if it holds no pending entries:
-- XGROUP DELCONSUMER drops a consumer's pending entries with it, and those are sales
-- not yet in PostgreSQL. Checking and deleting in one script leaves no gap between.
--
-- KEYS[1] stream, ARGV[1] group, ARGV[2] consumer
-- Returns 1 if removed, 0 if it had pending entries.

if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then
  return 0
end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return 1
