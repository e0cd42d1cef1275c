-- Removes from a stream the entries its consumer group has acknowledged, and nothing
-- else: every entry below the oldest one still pending and below the first one never
-- delivered. Group state only, so it holds after Redis was replaced or restored.
--
-- KEYS[1] stream, ARGV[1] consumer group
-- Returns the number of entries removed.

local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return {tonumber(ms), tonumber(seq)}
end
local function before(a, b)
  return a[1] < b[1] or (a[1] == b[1] and a[2] < b[2])
end

if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
local delivered
for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local fields = {}
  for i = 1, #group, 2 do fields[group[i]] = group[i + 1] end
  if fields['name'] == ARGV[1] then delivered = fields['last-delivered-id'] end
end
if not delivered then
  return 0
end
local bound = parse(delivered)
bound[2] = bound[2] + 1
local pending = redis.call('XPENDING', KEYS[1], ARGV[1])
if pending[2] then
  local oldest = parse(pending[2])
  if before(oldest, bound) then bound = oldest end
end
return redis.call('XTRIM', KEYS[1], 'MINID', string.format('%d-%d', bound[1], bound[2]))
