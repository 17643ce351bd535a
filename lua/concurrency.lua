-- Strategy concurrency: at most `limit` units in flight. A request takes a lease of `cost`
-- units and gives it back when its stream ends (release.lua); a lease that is never given
-- back expires after `lease` ms.
-- Params: limit = units in flight, period = lease ms. The lease id comes from the controller.
-- Verdict: remaining = limit - units in flight; reset = ms until the earliest lease expires;
-- retry = the same, at most 1000 ms (slots usually free when requests finish).
--
-- State: two keys with the same hash tag (so one Redis Cluster slot):
--   the limit's key  sorted set, ONE member per lease whatever its cost:
--                    "<lease id>=<cost>", score = expiry ms.
--   its units key    hash beside it (keys.rs `concurrency_units_key`: the strategy part of
--                    the limit's key replaced by "inflight"), fields
--                    units  = the sum of the costs of the set's leases,
--                    leases = how many members that sum is of.
-- Work: a grant is one ZADD, a release one ZREM (release.lua), whatever the cost; a check
-- removes the leases that expired (ZRANGEBYSCORE, their costs subtracted), so each lease is
-- paid for once. Nothing loops over a cost.
-- The hash is trusted only while `leases` is the set's ZCARD. When it is not (no hash; a
-- reset deleted the set; a controller of the old layout changed it; the hash was evicted),
-- it is rebuilt from the set: a "<id>=<cost>" member counts its cost, any other member one
-- unit. That reads the whole set, once per such change (never for this code's own writes).
-- Both keys: TTL = until the last lease expires, set on every write.
--
-- The units key is not in check.lua's KEYS: units_key() derives it from the limit's key
-- (the twin of keys::concurrency_units_key). It shares the limit key's hash tag, so it is in
-- the slot the script runs for (Redis Cluster lets a script touch undeclared keys of that
-- slot). release.lua gets it in KEYS.
--
-- Upgrade from the layout before this one (one member per unit, "<lease id>:<n>", no units
-- key, same key name): such a set has no units hash, so its first check rebuilds one, each
-- old member counting one unit, which is what it meant; old members then expire with their
-- leases as before. A release of a lease granted before the upgrade frees it when its cost
-- was 1 (release.lua); a costlier one's units come back when its lease expires. While old
-- and new controllers run side by side, an old controller counts a new lease as one unit
-- whatever its cost and cannot release one (it expires with its lease); a new controller
-- sees every change an old one makes as a changed member count and rebuilds the sum. One
-- change the count cannot show (an old controller sweeping an expired costly lease in the
-- same call that adds as many members) leaves the sum too high, never too low, until the set
-- empties or is rebuilt.
S.concurrency = {}

-- The units key of the limit whose key is `key`: keys::concurrency_units_key, in Lua.
local function units_key(key)
  local prefix, tag, rest = string.match(key, '^([^:]*):([^:]*):[^:]*:(.*)$')
  if prefix then
    return prefix .. ':' .. tag .. ':inflight:' .. rest
  end
  return key .. ':inflight'
end

-- What a member of the set holds: its cost, or one unit for a member of the old layout.
local function cost_of(member)
  local cost = string.match(member, '=(%d+)$')
  return cost and tonumber(cost) or 1
end

-- The units and leases held at `now`, after removing the leases that expired (the hash is
-- rebuilt first if it does not describe the set). `changed`: the state must be written back.
local function live(key, units_at, now)
  local stored = redis.call('HMGET', units_at, 'units', 'leases')
  local units, leases = tonumber(stored[1]), tonumber(stored[2])
  if not units or leases ~= redis.call('ZCARD', key) then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    units, leases = 0, redis.call('ZCARD', key)
    for first = 0, leases - 1, 1000 do
      for _, member in ipairs(redis.call('ZRANGE', key, first, first + 999)) do
        units = units + cost_of(member)
      end
    end
    return units, leases, stored[1] ~= false or leases > 0
  end
  local expired = redis.call('ZRANGEBYSCORE', key, '-inf', now)
  if #expired == 0 then
    return units, leases, false
  end
  for _, member in ipairs(expired) do
    units = units - cost_of(member)
  end
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  return math.max(0, units), leases - #expired, true
end

-- Writes the units hash, and both keys' TTL: until the last lease expires.
local function store(key, units_at, now, units, leases)
  if leases == 0 then
    -- The set is empty, so Redis has deleted it.
    redis.call('DEL', units_at)
    return
  end
  redis.call('HSET', units_at, 'units', string.format('%d', units),
             'leases', string.format('%d', leases))
  local latest = tonumber(redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')[2])
  U.expire(key, latest - now)
  U.expire(units_at, latest - now)
end

function S.concurrency.peek(key, now, cost, limit, lease)
  local units_at = units_key(key)
  local units, leases, changed = live(key, units_at, now)
  if changed then
    store(key, units_at, now, units, leases)
  end
  local ok = units + cost <= limit
  local after = ok and units + cost or units
  local earliest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  local first_expiry = earliest[2] and tonumber(earliest[2]) or nil
  if ok and cost > 0 and (not first_expiry or now + lease < first_expiry) then
    first_expiry = now + lease
  end
  local reset = (after > 0 and first_expiry) and first_expiry - now or 0
  return { ok = ok, remaining = limit - after, reset = reset,
           retry = ok and 0 or math.min(reset, 1000), delay = 0 }
end

function S.concurrency.commit(key, now, cost, limit, lease, extra, v, lease_id)
  local units_at = units_key(key)
  local units, leases = live(key, units_at, now)
  local member = lease_id .. '=' .. string.format('%d', cost)
  -- A lease id already in the set with this cost (never, for the controller's random ids)
  -- only moves its expiry: it holds its units once.
  if redis.call('ZADD', key, now + lease, member) == 1 then
    units = units + cost
    leases = leases + 1
  end
  store(key, units_at, now, units, leases)
end
