-- KEYS: leases. ARGV: now_ms|'', lease_ms, lease ids. The heartbeat: moves the expiry of the
-- leases still held; XX never brings back a lease that has expired (its slot may be taken).
-- Returns the positions (1-based) of the leases that are gone: expired, or freed by another
-- worker (a deferred request is closed by whichever worker Envoy's access log reaches), so
-- the holder stops renewing them.
local now = clock(ARGV[1])
local expiry = now + tonumber(ARGV[2])
local score = string.format('%d', expiry)
local gone = {}
for i = 3, #ARGV do
  if redis.call('ZADD', KEYS[1], 'XX', 'CH', score, ARGV[i]) == 0
      and not redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    table.insert(gone, i - 2)
  end
end
if redis.call('EXISTS', KEYS[1]) == 1 then lease_key_ttl(KEYS[1], expiry, now) end
return gone
