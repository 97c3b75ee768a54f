-- KEYS: leases. ARGV: now_ms|'', lease_ms, lease ids. The heartbeat: moves the expiry of the
-- leases still held; XX never brings back a lease that has expired (its slot may be taken).
local now = clock(ARGV[1])
local expiry = now + tonumber(ARGV[2])
local score = string.format('%d', expiry)
local renewed = 0
for i = 3, #ARGV do
  renewed = renewed + redis.call('ZADD', KEYS[1], 'XX', 'CH', score, ARGV[i])
end
if redis.call('EXISTS', KEYS[1]) == 1 then lease_key_ttl(KEYS[1], expiry, now) end
return renewed
