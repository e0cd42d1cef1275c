-- Prepended to every script of boxoffice that needs it (`lua_script!` in src/lib.rs).

-- The run id of this Redis server process. It is new at every start, so it tells a
-- server that may have lost or rewound data (restarted, restored from a file, failed
-- over to another server) from the one an event was last checked on.
local function server_run_id()
  local info = redis.call('INFO', 'server')
  local at = string.find(info, 'run_id:', 1, true)
  return string.sub(info, at + 7, at + 46)
end

