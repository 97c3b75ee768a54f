-- Shared by every limiter script (prepended by redis.py). Mirrors `drain`, `fits`
-- (decisions.py) and `MemoryLimiter._load/_store` (memory.py) line for line. Numbers are
-- written with '%d': Redis would otherwise format Lua numbers with '%.14g' and round levels
-- above 1e14.
local W = 60000
local function clock(arg)
  if arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function load(key, now)
  local v = redis.call('HMGET', key, 'l', 't')
  return tonumber(v[1]) or 0, tonumber(v[2]) or now
end
local function drain(level, ts, now, rate)
  if now <= ts then return level end
  local elapsed = now - ts
  if elapsed > level / rate then return 0 end
  return level - elapsed * rate
end
local function fits(level, rate, cost)
  return level + cost * W <= rate * W
end
local function store(key, level, ts, rate)
  if level <= 0 then
    redis.call('DEL', key)
    return
  end
  redis.call('HSET', key, 'l', string.format('%d', level), 't', string.format('%d', ts))
  -- The key lives until the bucket has drained (plus a margin), then empty == absent.
  redis.call('PEXPIRE', key, string.format('%d', math.ceil(level / rate) + 1000))
end
-- Concurrency slots are leases: members of a sorted set scored by their expiry (ms). A lease
-- not renewed by its holder's heartbeat expires, so a dead replica's slots free themselves.
local function live_leases(key, now)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', string.format('%d', now))
  return redis.call('ZCARD', key)
end
local function lease_key_ttl(key, expiry, now)
  -- The set lives as long as its latest lease.
  local ttl = expiry - now
  if ttl > redis.call('PTTL', key) then redis.call('PEXPIRE', key, string.format('%d', ttl)) end
end
