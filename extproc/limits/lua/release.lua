-- KEYS: leases. ARGV: lease ids. Releasing a lease that expired or was released is a no-op.
redis.call('ZREM', KEYS[1], unpack(ARGV))
return 1
