-- Strategy token_bucket: a bucket of `burst` tokens refilled at `limit` tokens per window.
-- Tokens are counted in units of 1/window of a token, so that refill is exact integer
-- arithmetic: a token is `window` units and `limit` units flow in per ms.
-- Key: hash { u = units in the bucket, t = time of last update ms }; no key = a full bucket.
-- TTL = until the bucket is full again.
-- Params: limit, period = window ms, extra = burst (capacity in tokens).
-- Verdict: remaining = whole tokens left; reset = ms until full; retry = ms until this
-- request's tokens are there.
S.token_bucket = {}

function S.token_bucket.peek(key, now, cost, limit, window, burst)
  local capacity = burst * window
  local stored = redis.call('HMGET', key, 'u', 't')
  local units, last = capacity, now
  if stored[1] then
    local stored_last = tonumber(stored[2])
    units = math.min(capacity, tonumber(stored[1]) + math.max(0, now - stored_last) * limit)
    last = math.max(stored_last, now)
  end
  local need = cost * window
  local ok = units >= need
  local after = ok and units - need or units
  -- A bucket in debt (charged beyond what it held) refills only from `last`, ahead of now.
  local ahead = last - now
  return { ok = ok, remaining = U.floor_div(after, window),
           reset = U.ceil_div(capacity - after, limit) + ahead,
           retry = ok and 0 or U.ceil_div(need - units, limit) + ahead, delay = 0,
           units = after, last = last }
end

function S.token_bucket.commit(key, now, cost, limit, window, burst, v)
  redis.call('HSET', key, 'u', v.units, 't', v.last)
  U.expire(key, v.reset)
end

-- refund (lease_return.lua): puts back up to `units` tokens a lease took, no fuller than the
-- burst. No key: the bucket is full already.
function S.token_bucket.refund(key, now, units, limit, window, burst)
  local stored = redis.call('HMGET', key, 'u', 't')
  if not stored[1] then
    return 0
  end
  local capacity = burst * window
  local stored_last = tonumber(stored[2])
  local held = math.min(capacity, tonumber(stored[1]) + math.max(0, now - stored_last) * limit)
  local back = math.min(units * window, capacity - held)
  local after = held + back
  local last = math.max(stored_last, now)
  redis.call('HSET', key, 'u', after, 't', last)
  U.expire(key, U.ceil_div(capacity - after, limit) + (last - now))
  return U.floor_div(back, window)
end

-- charge (charge.lua): takes `units` tokens a request used beyond its reservation. Short of
-- tokens, the bucket stays empty until the shortfall has flowed in (its time of last update
-- moves ahead by that long). No key: a full bucket.
function S.token_bucket.charge(key, now, units, limit, window, burst)
  local capacity = burst * window
  local stored = redis.call('HMGET', key, 'u', 't')
  local held, last = capacity, now
  if stored[1] then
    local stored_last = tonumber(stored[2])
    held = math.min(capacity, tonumber(stored[1]) + math.max(0, now - stored_last) * limit)
    last = math.max(stored_last, now)
  end
  local need = units * window
  local after = 0
  if held >= need then
    after = held - need
  else
    last = last + U.ceil_div(need - held, limit)
  end
  redis.call('HSET', key, 'u', after, 't', last)
  U.expire(key, U.ceil_div(capacity - after, limit) + (last - now))
end
