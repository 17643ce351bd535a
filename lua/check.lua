-- check: decides a batch of requests, in order; each against several limits, all or nothing.
--
-- The controller sends this file after prelude.lua and every strategy file of lua/ (each
-- adds its entry to the table S) as one script, run with EVALSHA.
--
-- KEYS         the state of every limit of every request, request after request
--              (layout: see the strategy's file)
-- ARGV[1]      now in ms since the epoch, or "" to use the Redis server's TIME (production).
--              With an injected time, TTLs get 60 s more: Redis expires keys on its own clock.
-- ARGV[2]      number of requests in the batch
-- then per request: number of its limits n, lease id (names concurrency slots; may be ""),
--              then per limit: strategy name, cost (0 only reads), limit, period ms, extra
--              period: the window, or the lease for concurrency. extra: burst (token_bucket,
--              gcra), max delay ms (leaky_bucket), 0 otherwise.
--
-- Reply, per request: { index of its first limit that denied (1-based; 0 when admitted),
--          then per limit: remaining, reset_ms, retry_after_ms, delay_ms }
-- A request is admitted only if every one of its limits admits it; then every limit counts
-- it. When one denies, none counts it, and the others report their state as it is (cost 0).
-- Requests are decided in order: a later one sees what an earlier one consumed.

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

local function peek(l, cost)
  if l.limit == 0 then
    -- Limit 0 admits nothing (and keeps no state): every rate below divides by the limit.
    return { ok = cost == 0, remaining = 0, reset = 0, retry = cost == 0 and 0 or l.period, delay = 0 }
  end
  return l.strategy.peek(l.key, now, cost, l.limit, l.period, l.extra)
end

local reply = {}
local arg = 3
local key = 1
for _ = 1, tonumber(ARGV[2]) do
  local count = tonumber(ARGV[arg])
  local lease = ARGV[arg + 1]
  arg = arg + 2
  local limits = {}
  for i = 1, count do
    local strategy = S[ARGV[arg]]
    if not strategy then
      return redis.error_reply('unknown strategy ' .. tostring(ARGV[arg]))
    end
    limits[i] = {
      strategy = strategy,
      key = KEYS[key],
      cost = tonumber(ARGV[arg + 1]),
      limit = tonumber(ARGV[arg + 2]),
      period = tonumber(ARGV[arg + 3]),
      extra = tonumber(ARGV[arg + 4]),
    }
    arg = arg + 5
    key = key + 1
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
        l.strategy.commit(l.key, now, l.cost, l.limit, l.period, l.extra, verdicts[i], lease)
      end
    end
  else
    for i, l in ipairs(limits) do
      if i ~= denied_by then
        verdicts[i] = peek(l, 0)
      end
    end
  end

  reply[#reply + 1] = denied_by
  for _, v in ipairs(verdicts) do
    reply[#reply + 1] = v.remaining
    reply[#reply + 1] = v.reset
    reply[#reply + 1] = v.retry
    reply[#reply + 1] = v.delay
  end
end
return reply
