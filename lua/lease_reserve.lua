-- lease_reserve: reserves, for one lease holder, its share of each leased limit's lease
-- quota, so that the unused part of every lease on a limit stays within that quota, and
-- sizes it by the holder's own traffic.
--
-- KEYS     one hash of reservations per leased limit (keys::lease_holders_key: beside
--          the limit's own key, in its Cluster slot)
-- ARGV[1]  now in ms since the epoch, or "" to use the Redis server's TIME (production)
-- then per key: the holder (a filter worker and the kind of request its lease is for),
--          how long the lease lasts (ms), and the key's lease quota: what all leases on
--          that limit may hold at once
--
-- Key: hash, holder → "<end ms>:<units>:<reserved at ms>"; TTL = the latest end. A
-- holder's new reservation replaces its last (it asks again when its lease is spent, or no
-- longer used).
-- Reply: per key, the units reserved for the holder: about a second of its traffic (what
-- its last lease held over the time since it was reserved, if that lease has not ended;
-- else 16, as for a first lease), no more
-- than the quota split evenly between the live holders, nor than the others leave. A
-- holder given 0 is still noted, so that the holders who have the quota get a smaller
-- share when they ask again.

local FIRST_LEASE = 16
local RATE_PERIOD_MS = 1000

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
  local wanted = FIRST_LEASE
  for j = 1, #fields, 2 do
    local ends, units, at = string.match(fields[j + 1], '^(%d+):(%d+):(%d+)$')
    if fields[j] == holder then
      if ends and tonumber(ends) > now and tonumber(units) > 0 then
        local elapsed = math.max(1, now - tonumber(at))
        wanted = math.ceil(tonumber(units) * RATE_PERIOD_MS / elapsed)
      end
    elseif ends and tonumber(ends) > now then
      others = others + tonumber(units)
      holders = holders + 1
    else
      redis.call('HDEL', key, fields[j])
    end
  end
  local units = math.max(0, math.min(math.floor(quota / holders), quota - others, wanted))
  redis.call('HSET', key, holder, (now + ttl) .. ':' .. units .. ':' .. now)
  if redis.call('PTTL', key) < ttl then
    redis.call('PEXPIRE', key, ttl)
  end
  reply[i] = units
end
return reply
