-- check: decides a batch of requests, in order; each against several limits, all or nothing.
--
-- The controller sends this file after prelude.lua and every strategy file of lua/ (each
-- adds its entry to the table S) as one script, run with EVALSHA.
--
-- KEYS         the state of every limit of every request, request after request
--              (layout: see the strategy's file). A concurrency limit's units hash is not
--              among them: concurrency.lua derives its name from the limit's key (same
--              hash tag, so the same slot).
-- ARGV[1]      now in ms since the epoch, or "" to use the Redis server's TIME (production).
--              With an injected time, TTLs get 60 s more: Redis expires keys on its own clock.
-- ARGV[2]      number of requests in the batch
-- then per request: number of its limits n, lease id (names the request's concurrency
--              leases; may be ""),
--              then per limit: strategy name, cost (0 only reads), limit, period ms, extra,
--              penalty base ms, penalty max ms, penalty decay ms (all 0: no penalty)
--              period: the window, or the lease for concurrency. extra: burst (token_bucket,
--              gcra), max delay ms (leaky_bucket), 0 otherwise.
--              A limit with a penalty has a second key, right after its own: the penalty's
--              state (see penalty.lua).
--
-- Reply, per request: { index of its first limit that denied (1-based; 0 when admitted),
--          then per limit: remaining, reset_ms, retry_after_ms, delay_ms, cooling }
--          cooling is 1 when the limit denied because the client is cooling down (or it
--          just began to: retry_after_ms is then the cool-down), 0 otherwise.
-- A limit with a penalty denies, without consulting its strategy, while the client cools
-- down; when its strategy denies a request outside a cool-down, the client gets a strike
-- and a cool-down (penalty.lua).
-- A request is admitted only if every one of its limits admits it; then every limit counts
-- it. When one denies, none counts it, and the others report their state as it is (cost 0).
-- Requests are decided in order: a later one sees what an earlier one consumed.

local now = U.clock(ARGV[1])

local function peek(l, cost)
  if l.penalty_key and cost > 0 then
    local cooling = P.cooling(l.penalty_key, now)
    if cooling > 0 then
      return { ok = false, remaining = 0, reset = cooling, retry = cooling, delay = 0,
               cooling = 1 }
    end
  end
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
      penalty_base = tonumber(ARGV[arg + 5]),
      penalty_max = tonumber(ARGV[arg + 6]),
      penalty_decay = tonumber(ARGV[arg + 7]),
    }
    arg = arg + 8
    key = key + 1
    if limits[i].penalty_base > 0 then
      limits[i].penalty_key = KEYS[key]
      key = key + 1
    end
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
    -- The limit that denied, outside a cool-down: one more strike, and a cool-down that
    -- the client is told as its retry time.
    local l = limits[denied_by]
    if l.penalty_key and l.cost > 0 and (verdicts[denied_by].cooling or 0) == 0 then
      local cooldown = P.strike(l.penalty_key, now, l.penalty_base, l.penalty_max,
                                l.penalty_decay)
      local v = verdicts[denied_by]
      v.retry = math.max(v.retry, cooldown)
      v.reset = math.max(v.reset, cooldown)
      v.cooling = 1
    end
  end

  reply[#reply + 1] = denied_by
  for _, v in ipairs(verdicts) do
    -- A limit lowered below what its key has counted leaves less than nothing: none.
    reply[#reply + 1] = math.max(0, v.remaining)
    reply[#reply + 1] = v.reset
    reply[#reply + 1] = v.retry
    reply[#reply + 1] = v.delay
    reply[#reply + 1] = v.cooling or 0
  end
end
return reply
