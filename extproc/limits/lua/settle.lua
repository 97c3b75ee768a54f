-- KEYS: tpm. ARGV: now_ms|'', tpm, reserved, actual.
local now = clock(ARGV[1])
local tpm, reserved, actual = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local level, ts = load(KEYS[1], now)
level = drain(level, ts, now, tpm)
level = math.max(0, level + (actual - reserved) * W)
store(KEYS[1], level, math.max(ts, now), tpm)
return 1
