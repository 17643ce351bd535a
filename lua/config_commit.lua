-- config_commit: replaces the configuration if it is still at the version the change was
-- made from (optimistic concurrency), and records the change in the audit log, atomically.
--
-- KEYS[1]  the configuration document (JSON: version, state, document)
-- KEYS[2]  the configuration's version (an integer; absent means 0)
-- KEYS[3]  the audit log (a list, newest first)
-- ARGV[1]  the version the change was made from
-- ARGV[2]  the new configuration (JSON), whose version is ARGV[1] + 1
-- ARGV[3]  the audit entry (JSON)
-- ARGV[4]  how many audit entries to keep
--
-- Reply: { 1, new version } when committed; { 0, current version } when the configuration
-- has moved on since (nothing is written). No key has a TTL: the configuration is kept
-- until it is replaced.

local current = tonumber(redis.call('GET', KEYS[2]) or '0')
if current ~= tonumber(ARGV[1]) then
  return { 0, current }
end
local next = current + 1
redis.call('SET', KEYS[1], ARGV[2])
redis.call('SET', KEYS[2], next)
redis.call('LPUSH', KEYS[3], ARGV[3])
redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[4]) - 1)
return { 1, next }
