-- KEYS: tpm, leases[, budget]. ARGV: now_ms|'', tpm (0: no settling), reserved, actual,
-- lease_id|'', charge_nano|''. Settle, release and charge in one round trip, atomically: a
-- request's end. Returns -1, having changed nothing, when the budget counter needs seeding.
if ARGV[6] ~= '' and redis.call('EXISTS', KEYS[3]) == 0 then return -1 end
local tpm, reserved, actual = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
if tpm > 0 and reserved ~= actual then
  local now = clock(ARGV[1])
  local level, ts = load(KEYS[1], now)
  level = drain(level, ts, now, tpm)
  level = math.max(0, level + (actual - reserved) * W)
  store(KEYS[1], level, math.max(ts, now), tpm)
end
if ARGV[5] ~= '' then redis.call('ZREM', KEYS[2], ARGV[5]) end
if ARGV[6] ~= '' then redis.call('INCRBY', KEYS[3], ARGV[6]) end
return 1
