-- Strategy sliding_window_log: exact; a request counts for `window` ms after it was made.
-- Key: sorted set, one member per unit of cost admitted (score = time ms), plus the member
-- '#seq' whose negative score numbers the entries. At most `limit` entries + 1 per key
-- (the controller caps limit at 100000 for this strategy). TTL = until the newest entry expires.
-- Params: limit = requests per window, period = window ms.
-- Verdict: remaining; reset = ms until every counted request has left the window;
-- retry = ms until enough have left for this request.
S.sliding_window_log = {}

function S.sliding_window_log.peek(key, now, cost, limit, window)
  redis.call('ZREMRANGEBYSCORE', key, 0, now - window)
  local count = redis.call('ZCOUNT', key, 0, '+inf')
  local ok = count + cost <= limit
  local after = ok and count + cost or count
  local newest = now
  local stored_newest = redis.call('ZREVRANGEBYSCORE', key, '+inf', 0, 'WITHSCORES', 'LIMIT', 0, 1)
  if stored_newest[2] then
    local t = tonumber(stored_newest[2])
    if not (ok and cost > 0) or t > newest then
      newest = t
    end
  end
  local reset = after > 0 and newest + window - now or 0
  local retry = 0
  if not ok then
    local k = count + cost - limit
    local leaving = redis.call('ZRANGEBYSCORE', key, 0, '+inf', 'WITHSCORES', 'LIMIT', k - 1, 1)
    retry = leaving[2] and tonumber(leaving[2]) + window - now or window
  end
  return { ok = ok, remaining = limit - after, reset = reset, retry = retry, delay = 0 }
end

function S.sliding_window_log.commit(key, now, cost, limit, window, extra, v)
  local top = -tonumber(redis.call('ZINCRBY', key, -cost, '#seq'))
  local names = {}
  for n = top - cost + 1, top do
    names[#names + 1] = 'e' .. n
  end
  U.zadd_many(key, now, names)
  U.expire(key, v.reset)
end
