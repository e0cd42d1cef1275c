-- Sets aside a stream entry that PostgreSQL refuses for good, so that it stops
-- holding up the sales behind it: copies it to the event's dead-letter stream with
-- the reason, then acknowledges it, in one step so that it cannot be lost between.
--
-- KEYS[1] stream of sales, KEYS[2] dead-letter stream
-- ARGV[1] consumer group, ARGV[2] entry id, ARGV[3] reason
-- Returns 1 if parked, 0 if the entry is gone (already acknowledged and trimmed).

local found = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2])
if #found == 0 then
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
