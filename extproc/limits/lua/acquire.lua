-- KEYS: rpm, tpm, leases[, budget]. ARGV: now_ms|'', rpm, tpm, max_concurrent, tokens,
-- lease_ms, budget_nano|'', lease_id. Returns {-1} when the month's budget counter must be
-- seeded first (from the usage ledger, which only the caller can read), having changed
-- nothing. All or nothing: a request, its tokens and its lease are taken together.
local over = 0
if ARGV[7] ~= '' then
  local spent = redis.call('GET', KEYS[4])
  if not spent then return {-1} end
  -- Compared as decimal strings (non-negative, no leading zeros): Lua's doubles would round
  -- amounts above 2^53 nano-dollars (about $9M).
  local budget = ARGV[7]
  if #spent > #budget or (#spent == #budget and spent >= budget) then over = 1 end
end
local now = clock(ARGV[1])
local rpm, tpm, cmax = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local tokens, lease_ms = tonumber(ARGV[5]), tonumber(ARGV[6])
local rl, rt = load(KEYS[1], now)
local tl, tt = load(KEYS[2], now)
if rpm > 0 then rl = drain(rl, rt, now, rpm) end
if tpm > 0 then tl = drain(tl, tt, now, tpm) end
local inflight = 0
if cmax > 0 then inflight = live_leases(KEYS[3], now) end
local ok = over == 0
  and (rpm == 0 or fits(rl, rpm, 1))
  and (tpm == 0 or fits(tl, tpm, tokens))
  and (cmax == 0 or inflight + 1 <= cmax)
if ok then
  if rpm > 0 then
    rl = rl + W
    store(KEYS[1], rl, math.max(rt, now), rpm)
  end
  if tpm > 0 then
    tl = tl + tokens * W
    store(KEYS[2], tl, math.max(tt, now), tpm)
  end
  if cmax > 0 then
    redis.call('ZADD', KEYS[3], string.format('%d', now + lease_ms), ARGV[8])
    lease_key_ttl(KEYS[3], now + lease_ms, now)
    inflight = inflight + 1
  end
end
return {ok and 1 or 0, now, rl, tl, inflight, over}
