-- KEYS: rpm, tpm, leases. ARGV: now_ms|'', rpm, tpm. Read-only.
local now = clock(ARGV[1])
local rpm, tpm = tonumber(ARGV[2]), tonumber(ARGV[3])
local rl, rt = load(KEYS[1], now)
local tl, tt = load(KEYS[2], now)
if rpm > 0 then rl = drain(rl, rt, now, rpm) else rl = 0 end
if tpm > 0 then tl = drain(tl, tt, now, tpm) else tl = 0 end
local inflight = redis.call('ZCOUNT', KEYS[3], '(' .. string.format('%d', now), '+inf')
return {now, rl, tl, inflight}
