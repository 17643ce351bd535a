-- lease_return: gives back what leases took from their limits and did not admit, when a
-- filter worker returns a lease it will not use up (its demand dropped, or the
-- configuration changed). Sent after prelude.lua and the strategy files it dispatches to
-- (fixed_window, token_bucket, gcra: the strategies that can be leased).
--
-- KEYS     per refund, three keys in the limit's Cluster slot: the limit's state, the set
--          of grants already returned to it (keys::lease_refunds_key), and the limit's
--          lease reservations (keys::lease_holders_key, see lease_reserve.lua)
-- ARGV[1]  now in ms since the epoch, or "" to use the Redis server's TIME (production).
--          With an injected time, TTLs get 60 s more: Redis expires keys on its own clock.
-- then per refund: strategy name, units to give back (in request costs), limit, period ms,
--          extra (the burst), counted_in (a fixed window's start when the lease was
--          counted; 0 otherwise), grant id, how long to remember the grant (ms), holder
--
-- Reply: per refund, the units given back: 0 when the grant was already returned to this
-- limit (a replay gives nothing), when the window it was counted in has ended, or when the
-- state holds nothing taken (a full bucket, no debt). Never more than the state holds:
-- the limit admits no more than it would have, had the lease never been taken.
-- Writes: the grant joins the set (TTL at least the remember time); the holder's
-- reservation is deleted (it holds nothing now); the limit's state as its strategy's
-- `refund` says.

local now = U.clock(ARGV[1])

local reply = {}
for i = 1, #KEYS / 3 do
  local key, refunded, holders = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]
  local a = 1 + 9 * (i - 1)
  local strategy = S[ARGV[a + 1]]
  local units = tonumber(ARGV[a + 2])
  local limit, period, extra = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5])
  local counted_in = tonumber(ARGV[a + 6])
  local grant, remember, holder = ARGV[a + 7], tonumber(ARGV[a + 8]), ARGV[a + 9]
  if not strategy or not strategy.refund then
    return redis.error_reply('strategy cannot be leased: ' .. tostring(ARGV[a + 1]))
  end
  redis.call('HDEL', holders, holder)
  local given = 0
  if redis.call('SADD', refunded, grant) == 1 then
    if redis.call('PTTL', refunded) < remember then
      U.expire(refunded, remember)
    end
    if limit > 0 and period > 0 and units > 0 then
      given = strategy.refund(key, now, units, limit, period, extra, counted_in)
    end
  end
  reply[i] = given
end
return reply
