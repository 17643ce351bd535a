-- Strategy concurrency: at most `limit` requests in flight. A request takes a lease (one
-- member per unit of cost, score = expiry ms) and gives it back when its stream ends
-- (release.lua); a lease that is never given back expires after `lease` ms.
-- Key: sorted set of leases; TTL = until the last lease expires.
-- Params: limit = requests in flight, period = lease ms. The lease id comes from the controller.
-- Verdict: remaining = free slots; reset = ms until the earliest lease expires;
-- retry = the same, at most 1000 ms (slots usually free when requests finish).
S.concurrency = {}

function S.concurrency.peek(key, now, cost, limit, lease)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  local count = redis.call('ZCARD', key)
  local ok = count + cost <= limit
  local after = ok and count + cost or count
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
  local names = {}
  for n = 1, cost do
    names[#names + 1] = lease_id .. ':' .. n
  end
  U.zadd_many(key, now + lease, names)
  local latest = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  U.expire(key, tonumber(latest[2]) - now)
end
