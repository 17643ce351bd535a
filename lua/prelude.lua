-- prelude: the tables every strategy file fills (S) and uses (U). Sent first.
-- Integer division helpers stay exact for operands below 2^53, where a plain
-- math.floor(a / b) can round the wrong way.
local S = {}
local U = {}

function U.floor_div(a, b)
  local q = math.floor(a / b)
  if q * b > a then
    q = q - 1
  elseif (q + 1) * b <= a then
    q = q + 1
  end
  return q
end

function U.ceil_div(a, b)
  local q = U.floor_div(a, b)
  if q * b < a then
    q = q + 1
  end
  return q
end

-- ZADD of many members, in chunks: unpack() of a long list overflows Lua's C stack.
function U.zadd_many(key, score, names)
  local args = {}
  for i = 1, #names do
    args[#args + 1] = score
    args[#args + 1] = names[i]
    if #args >= 1000 or i == #names then
      redis.call('ZADD', key, unpack(args))
      args = {}
    end
  end
end

-- GCRA's and the leaky bucket's state: a lead over now ("debt", in units of 1/limit ms)
-- that is paid at `limit` units per ms. Returns the debt left at `now` and the later of
-- the stored time and now (the clock may have gone back). No key: no debt.
function U.debt_now(key, now, limit)
  local stored = redis.call('HMGET', key, 'd', 't')
  if not stored[1] then
    return 0, now
  end
  local stored_last = tonumber(stored[2])
  local debt = math.max(0, tonumber(stored[1]) - math.max(0, now - stored_last) * limit)
  return debt, math.max(stored_last, now)
end

-- The time a script counts on, in ms since the epoch: `injected` (ARGV[1]: tests give one)
-- or, when it is "", the Redis server's TIME (production). Also sets U.expire, which keeps a
-- key for `ttl` ms; with an injected time 60 s more, as Redis expires keys on its own clock.
function U.clock(injected)
  local now, ttl_extra
  if injected ~= '' then
    now, ttl_extra = tonumber(injected), 60000
  else
    local time = redis.call('TIME')
    now, ttl_extra = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000), 0
  end
  U.expire = function(key, ttl)
    redis.call('PEXPIRE', key, math.max(1, ttl) + ttl_extra)
  end
  return now
end
