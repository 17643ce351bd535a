-- lease_reserve: reserves, for one lease holder, its share of each leased limit's lease
-- quota, so that the unused part of every lease on a limit stays within that quota.
--
-- KEYS     one hash of reservations per leased limit (keys::lease_holders_key: beside
--          the limit's own key, in its Cluster slot)
-- ARGV[1]  now in ms since the epoch, or "" to use the Redis server's TIME (production)
-- then per key: the holder (a filter worker and the kind of request its lease is for),
--          how long the lease lasts (ms), and the key's lease quota: what all leases on
--          that limit may hold at once
--
-- Key: hash, holder → "<end ms>:<units>" (a reservation ends with its lease); TTL = the
-- latest end. A holder's new reservation replaces its last (it asks again when its lease is
-- spent, or no longer used).
-- Reply: per key, the units reserved for the holder: the quota split evenly between the
-- live holders, and no more than the others leave. A holder given 0 is still noted, so
-- that the holders who have the quota get a smaller share when they ask again.

local now
if ARGV[1] ~= '' then
  now = tonumber(ARGV[1])
else
  local time = redis.call('TIME')
  now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
end
local reply = {}
for i, key in ipairs(KEYS) do
  local holder = ARGV[3 * i - 1]
  local ttl = tonumber(ARGV[3 * i])
  local quota = tonumber(ARGV[3 * i + 1])
  local fields = redis.call('HGETALL', key)
  local others, holders = 0, 1
  for j = 1, #fields, 2 do
    if fields[j] ~= holder then
      local ends, units = string.match(fields[j + 1], '^(%d+):(%d+)$')
      if ends and tonumber(ends) > now then
        others = others + tonumber(units)
        holders = holders + 1
      else
        redis.call('HDEL', key, fields[j])
      end
    end
  end
  local units = math.max(0, math.min(math.floor(quota / holders), quota - others))
  -- A holder that gets nothing still counts as one, so that the next split makes room.
  redis.call('HSET', key, holder, (now + ttl) .. ':' .. units)
  if redis.call('PTTL', key) < ttl then
    redis.call('PEXPIRE', key, ttl)
  end
  reply[i] = units
end
return reply
