-- charge: charges usage a request reported beyond what it reserved when it was admitted
-- (a usage rule's reservation settled by its response). Sent after prelude.lua and the
-- strategy files it dispatches to (fixed_window, token_bucket, gcra: the strategies that
-- can settle usage). What was reserved and not used goes back through lease_return.lua.
--
-- KEYS     per charge, two keys in the limit's Cluster slot: the limit's state, and the
--          set of grants and reservations already settled on it (keys::lease_refunds_key)
-- ARGV[1]  now in ms since the epoch, or "" to use the Redis server's TIME (production).
--          With an injected time, TTLs get 60 s more: Redis expires keys on its own clock.
-- then per charge: strategy name, units to charge (in request costs), limit, period ms,
--          extra (the burst), reservation id, how long to remember the reservation (ms)
--
-- Reply: per charge, the units charged: 0 when the reservation was settled on this limit
-- before (a replay charges nothing).
-- Writes: the reservation joins the set (TTL at least the remember time); the limit's state
-- as its strategy's `charge` says: in full, past the limit if need be (the usage happened).

local now = U.clock(ARGV[1])

local reply = {}
for i = 1, #KEYS / 2 do
  local key, settled = KEYS[2 * i - 1], KEYS[2 * i]
  local a = 1 + 7 * (i - 1)
  local strategy = S[ARGV[a + 1]]
  local units = tonumber(ARGV[a + 2])
  local limit, period, extra = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5])
  local reservation, remember = ARGV[a + 6], tonumber(ARGV[a + 7])
  if not strategy or not strategy.charge then
    return redis.error_reply('strategy cannot settle usage: ' .. tostring(ARGV[a + 1]))
  end
  local charged = 0
  if redis.call('SADD', settled, reservation) == 1 then
    if redis.call('PTTL', settled) < remember then
      U.expire(settled, remember)
    end
    if limit > 0 and period > 0 and units > 0 then
      strategy.charge(key, now, units, limit, period, extra)
      charged = units
    end
  end
  reply[i] = charged
end
return reply
