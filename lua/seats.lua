-- Reads an event's counters, and whether it may be sold from on this server.
--
-- KEYS[1] inventory hash
-- Returns {} when the event is missing, else {total, sold, purchases, rejected,
-- on sale, held}: on sale is 1 when the event was checked on this server process
-- (see purchase.lua), 0 when its counters may still be behind.

local inventory = redis.call('HMGET', KEYS[1], 'total', 'sold', 'purchases', 'rejected', 'run', 'held')
if not inventory[1] or not inventory[2] then
  return {}
end
local on_sale = 0
if inventory[5] == server_run_id() then
  on_sale = 1
end
return {inventory[1], inventory[2], inventory[3] or '0', inventory[4] or '0', on_sale, inventory[6] or '0'}
