-- Strategy gcra: generic cell rate algorithm. Requests are due one every window/limit ms;
-- up to `burst` may come early. Kept as the theoretical arrival time's lead over now
-- ("debt"), in units of 1/limit ms so that the emission interval is exactly `window` units.
-- Key: hash { d = debt units, t = time of last update ms }; no key = no debt.
-- TTL = until the debt is paid.
-- Params: limit, period = window ms, extra = burst (requests that may come at once).
-- Verdict: remaining = requests that could come now; reset = ms until no debt;
-- retry = ms until this request conforms.
S.gcra = {}

function S.gcra.peek(key, now, cost, limit, window, burst)
  local tolerance = burst * window
  local debt, last = U.debt_now(key, now, limit)
  local wanted = debt + cost * window
  local ok = wanted <= tolerance
  local after = ok and wanted or debt
  return { ok = ok, remaining = U.floor_div(tolerance - after, window),
           reset = U.ceil_div(after, limit),
           retry = ok and 0 or U.ceil_div(wanted - tolerance, limit), delay = 0,
           debt = after, last = last }
end

function S.gcra.commit(key, now, cost, limit, window, burst, v)
  redis.call('HSET', key, 'd', v.debt, 't', v.last)
  U.expire(key, v.reset)
end

-- refund (lease_return.lua): takes back up to `units` requests' worth of the debt a lease
-- ran up, down to none. No key: no debt.
function S.gcra.refund(key, now, units, limit, window, burst)
  if redis.call('EXISTS', key) == 0 then
    return 0
  end
  local debt, last = U.debt_now(key, now, limit)
  local back = math.min(units * window, debt)
  local after = debt - back
  redis.call('HSET', key, 'd', after, 't', last)
  U.expire(key, U.ceil_div(after, limit))
  return U.floor_div(back, window)
end

-- charge (charge.lua): adds `units` requests' worth a request used beyond its reservation
-- to the debt, past the burst if need be. No key: no debt.
function S.gcra.charge(key, now, units, limit, window, burst)
  local debt, last = U.debt_now(key, now, limit)
  local after = debt + units * window
  redis.call('HSET', key, 'd', after, 't', last)
  U.expire(key, U.ceil_div(after, limit))
end
