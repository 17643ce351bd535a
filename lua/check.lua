-- check: decides one request against several limits at once, all or nothing.
--
-- The controller sends this file after every strategy file of lua/ (each adds its entry to
-- the table S) as one script, run with EVALSHA.
--
-- KEYS[i]      state of limit i (layout: see the strategy's file)
-- ARGV[1]      now in ms since the epoch, or "" to use the Redis server's TIME (production).
--              With an injected time, TTLs get 60 s more: Redis expires keys on its own clock.
-- ARGV[2+6(i-1) .. 7+6(i-1)], for limit i:
--              strategy name, cost (0 only reads), limit, period ms, extra, lease id
--              period: the window, or the lease for concurrency. extra: burst (token_bucket,
--              gcra), max delay ms (leaky_bucket), 0 otherwise. lease id: concurrency only.
--
-- Reply: { index of the first limit that denied (1-based; 0 when the request is admitted),
--          then per limit: remaining, reset_ms, retry_after_ms, delay_ms }
-- A request is admitted only if every limit admits it; then every limit counts it. When one
-- denies, none counts it, and the others report their state as it is (cost 0).

local now
local ttl_extra = 0
if ARGV[1] ~= '' then
  now = tonumber(ARGV[1])
  ttl_extra = 60000
else
  local time = redis.call('TIME')
  now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
end

local function expire(key, ttl)
  redis.call('PEXPIRE', key, math.max(1, ttl) + ttl_extra)
end
U.expire = expire

local limits = {}
for i = 1, #KEYS do
  local base = 2 + 6 * (i - 1)
  local strategy = S[ARGV[base]]
  if not strategy then
    return redis.error_reply('unknown strategy ' .. tostring(ARGV[base]))
  end
  limits[i] = {
    strategy = strategy,
    key = KEYS[i],
    cost = tonumber(ARGV[base + 1]),
    limit = tonumber(ARGV[base + 2]),
    period = tonumber(ARGV[base + 3]),
    extra = tonumber(ARGV[base + 4]),
    lease = ARGV[base + 5],
  }
end

local function peek(l, cost)
  if l.limit == 0 then
    -- Limit 0 admits nothing (and keeps no state): every rate below divides by the limit.
    return { ok = cost == 0, remaining = 0, reset = 0, retry = cost == 0 and 0 or l.period, delay = 0 }
  end
  return l.strategy.peek(l.key, now, cost, l.limit, l.period, l.extra)
end

local verdicts = {}
local denied_by = 0
for i, l in ipairs(limits) do
  verdicts[i] = peek(l, l.cost)
  if denied_by == 0 and not verdicts[i].ok then
    denied_by = i
  end
end

if denied_by == 0 then
  for i, l in ipairs(limits) do
    if l.cost > 0 and l.limit > 0 then
      l.strategy.commit(l.key, now, l.cost, l.limit, l.period, l.extra, verdicts[i], l.lease)
    end
  end
else
  for i, l in ipairs(limits) do
    if i ~= denied_by then
      verdicts[i] = peek(l, 0)
    end
  end
end

local reply = { denied_by }
for _, v in ipairs(verdicts) do
  reply[#reply + 1] = v.remaining
  reply[#reply + 1] = v.reset
  reply[#reply + 1] = v.retry
  reply[#reply + 1] = v.delay
end
return reply
