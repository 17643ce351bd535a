-- Fixed window, several limits at once, all or nothing.
--
-- KEYS[i]   counter of limit i: a hash {s = window start (ms), c = count in that window}
-- ARGV[1]   cost of this request (0 only reads)
-- ARGV[2i]  limit i: requests admitted per window (0 admits nothing)
-- ARGV[2i+1] window i in milliseconds (> 0)
--
-- Reply: { allowed (1|0), index of the first limit that denied (1-based, 0 if none),
--          then per limit: count in the current window after this request, ms until it resets }
--
-- Windows are aligned to the Unix epoch on the Redis server's clock (TIME), so every
-- controller agrees whatever its own clock says. A denied request consumes from no limit.
-- Every write sets the key's TTL to the end of its window.

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local cost = tonumber(ARGV[1])

local counts, starts, resets = {}, {}, {}
local denied_by = 0
for i = 1, #KEYS do
  local limit = tonumber(ARGV[2 * i])
  local window = tonumber(ARGV[2 * i + 1])
  local start = now - (now % window)
  local stored = redis.call('HMGET', KEYS[i], 's', 'c')
  local count = 0
  -- The current window, or (when the clock went back) a later one: keep counting in it
  -- rather than admit a fresh window's worth again.
  local stored_start = tonumber(stored[1])
  if stored_start and stored_start >= start then
    start = stored_start
    count = tonumber(stored[2]) or 0
  end
  counts[i] = count
  starts[i] = start
  resets[i] = start + window - now
  if denied_by == 0 and count + cost > limit then
    denied_by = i
  end
end

local reply = { denied_by == 0 and 1 or 0, denied_by }
for i = 1, #KEYS do
  if denied_by == 0 and cost > 0 then
    counts[i] = counts[i] + cost
    redis.call('HSET', KEYS[i], 's', starts[i], 'c', counts[i])
    redis.call('PEXPIRE', KEYS[i], resets[i])
  end
  reply[#reply + 1] = counts[i]
  reply[#reply + 1] = resets[i]
end
return reply
