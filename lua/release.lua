-- release: gives back a concurrency lease when the request's stream ends.
-- KEYS[1]  the concurrency limit's sorted set
-- ARGV[1]  lease id, ARGV[2] cost the lease was taken with (members id:1 .. id:cost)
-- Reply: number of slots freed (0 when the lease had already expired or been released).
local members = {}
for n = 1, tonumber(ARGV[2]) do
  members[#members + 1] = ARGV[1] .. ':' .. n
end
return redis.call('ZREM', KEYS[1], unpack(members))
