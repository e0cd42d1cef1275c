-- Sends parked sales (park.lua) back to the stream for another try, e.g. after the
-- cause was fixed. The purchase id travels with each, so a sale written meanwhile is
-- not written twice.
--
-- KEYS[1] stream of sales, KEYS[2] dead-letter stream; ARGV[1] most entries to move
-- Returns the number of entries sent back (call again while it is ARGV[1]).

local moved = 0
for _, entry in ipairs(redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', ARGV[1])) do
  local fields = {}
  for i = 1, #entry[2], 2 do
    local name = entry[2][i]
    if name ~= 'reason' and name ~= 'entry' then
      table.insert(fields, name)
      table.insert(fields, entry[2][i + 1])
    end
  end
  redis.call('XADD', KEYS[1], '*', unpack(fields))
  redis.call('XDEL', KEYS[2], entry[1])
  moved = moved + 1
end
return moved
