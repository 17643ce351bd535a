-- penalty: a progressive cool-down for clients that keep hitting a rule's limit. Not a
-- strategy of its own: the driver (check.lua) consults it for a limit that has one.
-- Key: hash { s = strikes, u = end of the cool-down ms, l = time of the last strike ms };
-- no key = no strikes. TTL: until the cool-down has ended and every strike has decayed.
-- Params: base, max (cool-down bounds, ms), decay (ms without a denial that forgive one
-- strike).
-- P.cooling: ms of cool-down left at now (0: none).
-- P.strike: one more strike at now; returns the new cool-down in ms:
--   min(max, base * 2^(strikes - 1)), after forgiving one strike per `decay` since the last
--   cool-down ended (a client refused all through its cool-down is not forgiven for it).
local P = {}

function P.cooling(key, now)
  local until_ms = tonumber(redis.call('HGET', key, 'u') or '0')
  return math.max(0, until_ms - now)
end

function P.strike(key, now, base, max, decay)
  local stored = redis.call('HMGET', key, 's', 'u')
  local strikes = tonumber(stored[1] or '0')
  local cooled = tonumber(stored[2] or now)
  -- The clock may have gone back: no time has passed, nothing is forgiven.
  local forgiven = U.floor_div(math.max(0, now - cooled), decay)
  strikes = math.max(0, strikes - forgiven) + 1
  -- Doubling past 2^40 of anything is past any max: stop there (exact in Lua numbers).
  local cooldown = base * 2 ^ math.min(strikes - 1, 40)
  cooldown = math.min(max, cooldown)
  redis.call('HSET', key, 's', strikes, 'u', now + cooldown, 'l', now)
  U.expire(key, cooldown + strikes * decay)
  return cooldown
end
