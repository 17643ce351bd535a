-- Strategy leaky_bucket: a queue drained at `limit` requests per window. A request that
-- finds a queue is admitted with a delay (its slot), up to `max_delay` ms; past that it is
-- denied. The controller holds the answer for the delay. The queue is kept as the time
-- until it drains, in units of 1/limit ms (a request is `window` units).
-- Key: hash { d = queued units, t = time of last update ms }; TTL = until the queue drains.
-- Params: limit, period = window ms, extra = max delay ms.
-- Verdict: remaining = requests that would still be admitted now; reset = ms until the
-- queue drains; retry = ms until a request would wait no more than max delay;
-- delay = ms this request waits for its slot.
S.leaky_bucket = {}

function S.leaky_bucket.peek(key, now, cost, limit, window, max_delay)
  local queued, last = U.debt_now(key, now, limit)
  local delay = U.ceil_div(queued, limit)
  local ok = delay <= max_delay
  local after = ok and queued + cost * window or queued
  local bound = max_delay * limit
  return { ok = ok,
           remaining = after <= bound and U.floor_div(bound - after, window) + 1 or 0,
           reset = U.ceil_div(after, limit),
           retry = ok and 0 or U.ceil_div(queued - bound, limit),
           delay = ok and delay or 0,
           queued = after, last = last }
end

function S.leaky_bucket.commit(key, now, cost, limit, window, max_delay, v)
  redis.call('HSET', key, 'd', v.queued, 't', v.last)
  U.expire(key, v.reset)
end
