-- Strategy fixed_window: counts requests in windows aligned to the epoch.
-- Key: hash { s = window start ms, c = count in that window }, TTL = end of the window,
-- set by the commit that opens the window (later commits in it leave the TTL alone).
-- Params: limit = requests per window, period = window ms.
-- Verdict: remaining in this window; reset = ms until the window ends; retry = reset.
-- A stored window later than now (the clock went back) keeps counting.
S.fixed_window = {}

function S.fixed_window.peek(key, now, cost, limit, window)
  local start = now - (now % window)
  local stored = redis.call('HMGET', key, 's', 'c')
  local count = 0
  local stored_start = tonumber(stored[1])
  if stored_start and stored_start >= start then
    start = stored_start
    count = tonumber(stored[2]) or 0
  end
  local ok = count + cost <= limit
  local after = ok and count + cost or count
  local reset = start + window - now
  return { ok = ok, remaining = limit - after, reset = reset, retry = ok and 0 or reset, delay = 0,
           start = start, after = after, opens = start ~= stored_start }
end

function S.fixed_window.commit(key, now, cost, limit, window, extra, v)
  redis.call('HSET', key, 's', v.start, 'c', v.after)
  if v.opens then
    U.expire(key, v.reset)
  end
end

-- refund (lease_return.lua): gives back up to `units` a lease counted in the window that
-- starts at `counted_in`, while that window lasts; never below 0. The TTL stays the window's.
function S.fixed_window.refund(key, now, units, limit, window, burst, counted_in)
  local stored = redis.call('HMGET', key, 's', 'c')
  local start, count = tonumber(stored[1]), tonumber(stored[2]) or 0
  if start ~= counted_in or now >= start + window or count == 0 then
    return 0
  end
  local given = math.min(units, count)
  redis.call('HSET', key, 'c', count - given)
  return given
end

-- charge (charge.lua): counts `units` a request used beyond its reservation in the window
-- that is current now, past the limit if need be (the usage happened).
function S.fixed_window.charge(key, now, units, limit, window)
  local start = now - (now % window)
  local stored = redis.call('HMGET', key, 's', 'c')
  local stored_start = tonumber(stored[1])
  if stored_start and stored_start >= start then
    redis.call('HSET', key, 'c', (tonumber(stored[2]) or 0) + units)
  else
    redis.call('HSET', key, 's', start, 'c', units)
    U.expire(key, start + window - now)
  end
end
