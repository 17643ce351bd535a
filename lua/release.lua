-- release: gives back a concurrency lease when the request's stream ends.
-- KEYS[1]  the concurrency limit's sorted set
-- ARGV[1]  lease id, ARGV[2] cost the lease was taken with (members id:1 .. id:cost)
-- Reply: number of slots freed (0 when the lease had already expired or been released).
local freed = 0
local members = {}
local count = tonumber(ARGV[2])
for n = 1, count do
  members[#members + 1] = ARGV[1] .. ':' .. n
  if #members >= 1000 or n == count then
    freed = freed + redis.call('ZREM', KEYS[1], unpack(members))
    members = {}
  end
end
return freed
