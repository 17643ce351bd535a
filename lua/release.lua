-- release: gives back a concurrency lease when the request's stream ends.
-- KEYS[1]  the concurrency limit's sorted set (one member "<lease id>=<cost>" per lease,
--          see concurrency.lua)
-- KEYS[2]  its units hash (keys.rs `concurrency_units_key`; fields units, leases)
-- ARGV[1]  lease id, ARGV[2] the cost it was granted with (the controller signed both)
-- ARGV[3]  now in ms since the epoch, or "" to use the Redis server's TIME (production)
-- Reply: units freed: the lease's cost while it is held, 0 when it has expired or was
-- already released (a replay frees nothing).
-- Work: a few O(log n) commands on one member, whatever the cost: nothing loops over it.
-- Writes: the set loses the member (its TTL stays: the last lease's expiry); the hash gets
-- the new sum and the set's TTL. When the hash did not describe the set before (see
-- concurrency.lua), it is deleted instead, and the next check rebuilds it.
-- Upgrade: a lease granted before the layout of one member per lease, of cost 1, is the
-- member "<lease id>:1" (counted one unit by the rebuild) and is freed the same way; a
-- costlier one of that layout is left to expire with its lease.
local key, units_at = KEYS[1], KEYS[2]
local now
if ARGV[3] ~= '' then
  now = tonumber(ARGV[3])
else
  local time = redis.call('TIME')
  now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
end
local cost = tonumber(ARGV[2])
local member = ARGV[1] .. '=' .. string.format('%d', cost)
local score = redis.call('ZSCORE', key, member)
if not score and cost == 1 then
  member = ARGV[1] .. ':1'
  score = redis.call('ZSCORE', key, member)
end
if not score or tonumber(score) <= now then
  return 0
end

local stored = redis.call('HMGET', units_at, 'units', 'leases')
local members = redis.call('ZCARD', key)
redis.call('ZREM', key, member)
if not stored[1] or tonumber(stored[2]) ~= members then
  redis.call('DEL', units_at)
elseif members == 1 then
  -- The set is empty, so Redis has deleted it.
  redis.call('DEL', units_at)
else
  redis.call('HSET', units_at,
             'units', string.format('%d', math.max(0, tonumber(stored[1]) - cost)),
             'leases', string.format('%d', members - 1))
  local ttl = redis.call('PTTL', key)
  if ttl > 0 then
    redis.call('PEXPIRE', units_at, ttl)
  end
end
return cost
