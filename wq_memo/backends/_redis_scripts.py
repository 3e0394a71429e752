"""The Lua scripts behind RedisCache's single-flight lock; each runs atomically in Redis."""

from __future__ import annotations

from typing import Final

__all__ = ("CLAIM", "FINISH", "RENEW")

CLAIM: Final = """
-- KEYS: value, lock. ARGV: token, lease in ms, "1" to look at the value first.
-- Returns {1, value} when the value is stored, {2} when the lock was taken for token,
-- {3, remaining lease in ms} when another holder has the lock.
if ARGV[3] == '1' then
  local value = redis.call('GET', KEYS[1])
  if value then return {1, value} end
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {2} end
return {3, redis.call('PTTL', KEYS[2])}
"""

RENEW: Final = """
-- KEYS: lock. ARGV: token, lease in ms. Extends the lease only if token still holds the lock.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

FINISH: Final = """
-- KEYS: value, lock. ARGV: token, "1" to store the value, value, ttl in ms (0: none),
-- channel, message. Stores the value, deletes the lock only if token still holds it, and
-- wakes the waiters. Returns 1 if token held the lock, else 0.
if ARGV[2] == '1' then
  if tonumber(ARGV[4]) > 0 then
    redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
  else
    redis.call('SET', KEYS[1], ARGV[3])
  end
end
local held = 0
if redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('DEL', KEYS[2])
  held = 1
end
redis.call('PUBLISH', ARGV[5], ARGV[6])
return held
"""
