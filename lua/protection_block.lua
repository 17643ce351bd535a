-- protection_block: adds brute-force protection's blocks, bounded in number. Blocks live
-- beside the configuration, not in it: they change no version, flush no filter's denial
-- cache or leases, and write nothing to the operators' audit log.
-- KEYS[1]  the sorted set of blocks: member = address (as the denylist writes it),
--          score = when the block ends (ms since the epoch)
-- ARGV[1]  now (ms), ARGV[2] most blocks held at once, then pairs: address, end (ms)
-- Reply: the addresses blocked by this call (those already blocked, and those past the
--        bound, are left out). The key expires with its last block.
local now = tonumber(ARGV[1])
local most = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local held = redis.call('ZCARD', KEYS[1])
local added = {}
for i = 3, #ARGV, 2 do
  if held >= most then
    break
  end
  local address, ends = ARGV[i], tonumber(ARGV[i + 1])
  if ends > now and redis.call('ZADD', KEYS[1], 'NX', ends, address) == 1 then
    held = held + 1
    added[#added + 1] = address
  end
end
local latest = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
if latest[2] then
  redis.call('PEXPIREAT', KEYS[1], math.floor(tonumber(latest[2])))
end
return added
