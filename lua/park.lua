-- Sets aside a stream entry that PostgreSQL refuses for good, so that it stops
-- holding up the sales behind it: copies it to the event's dead-letter stream with
-- the reason, then acknowledges it, in one step so that it cannot be lost between.
--
-- Only the consumer the entry is pending for may park it: another consumer that
-- took it over (XAUTOCLAIM) meanwhile owns it now, and one already acknowledged was
-- written or parked by someone else. Checked here, in the step that acknowledges,
-- so that two consumers racing over one entry park it once.
--
-- KEYS[1] stream of sales, KEYS[2] dead-letter stream
-- ARGV[1] consumer group, ARGV[2] entry id, ARGV[3] reason, ARGV[4] consumer
-- Returns 1 if parked; -1 if the entry is not pending for ARGV[4] (nothing done);
-- 0 if it was pending but is gone from the stream (removed behind the service's
-- back: it is acknowledged, and what it recorded is lost).

local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1, ARGV[4])
if #pending == 0 then
  return -1
end
local found = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2])
if #found == 0 then
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
  return 0
end
local fields = found[1][2]
table.insert(fields, 'reason')
table.insert(fields, ARGV[3])
table.insert(fields, 'entry')
table.insert(fields, ARGV[2])
redis.call('XADD', KEYS[2], '*', unpack(fields))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
return 1
