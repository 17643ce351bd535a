-- Strategy sliding_window_counter: fixed windows, with the previous window's count weighted
-- by how much of it still overlaps the sliding window:
--   estimate = previous * (window - elapsed) / window + current
-- (computed as estimate * window in integers).
-- Key: hash { s = current window start ms, c = current count, p = previous count },
-- TTL = until the current window stops weighing (end of the next window).
-- Params: limit = requests per window, period = window ms.
-- Verdict: remaining = floor(limit - estimate); reset = ms until the estimate is 0;
-- retry = ms until the estimate leaves room for this request.
S.sliding_window_counter = {}

function S.sliding_window_counter.peek(key, now, cost, limit, window)
  local start = now - (now % window)
  local stored = redis.call('HMGET', key, 's', 'c', 'p')
  local stored_start = tonumber(stored[1])
  local current, previous = 0, 0
  if stored_start and stored_start >= start then
    start = stored_start
    current = tonumber(stored[2]) or 0
    previous = tonumber(stored[3]) or 0
  elseif stored_start and stored_start == start - window then
    previous = tonumber(stored[2]) or 0
  end
  local elapsed = math.max(0, now - start)
  local weighted = previous * (window - elapsed) + current * window
  local ok = weighted + cost * window <= limit * window
  local after_current = current
  if ok then
    after_current = current + cost
    weighted = weighted + cost * window
  end
  local to_window_end = start + window - now
  local reset = 0
  if after_current > 0 then
    reset = to_window_end + window
  elseif previous > 0 then
    reset = to_window_end
  end
  local retry = 0
  if not ok then
    local room = limit - current - cost
    if room >= 0 then
      retry = window - U.floor_div(room * window, previous) - elapsed
    elseif current > 0 then
      retry = to_window_end + window - U.floor_div((limit - cost) * window, current)
    else
      retry = to_window_end + window
    end
  end
  return { ok = ok, remaining = math.max(0, U.floor_div(limit * window - weighted, window)),
           reset = reset, retry = retry, delay = 0,
           start = start, current = after_current, previous = previous }
end

function S.sliding_window_counter.commit(key, now, cost, limit, window, extra, v)
  redis.call('HSET', key, 's', v.start, 'c', v.current, 'p', v.previous)
  U.expire(key, v.start + 2 * window - now)
end
