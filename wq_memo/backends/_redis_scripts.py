"""The Lua scripts behind RedisCache's single flight; each runs atomically in Redis.

Every write of a value goes through FINISH. A computed value is tied to the lock it was computed
under: FINISH stores it only while the computation's token still holds the lock, so a holder
whose lease ran out or whose key was deleted (DELETE removes the lock too) never overwrites a
later value. A clear cannot remove every lock at once (it scans): while it runs, the namespace's
epoch is set, and FINISH stores only a computation that took its lock under that very epoch;
once the clear has ended (and removed the epoch), every lock taken before it is gone. A primed
value is stored whoever holds the lock, and removes it, so that no computation that began
before it overwrites it.
"""

from __future__ import annotations

from typing import Final

__all__ = ("CLAIM", "CLEARED", "DELETE", "FINISH", "RENEW")

CLAIM: Final = """
-- KEYS: value, lock, marker, epoch.
-- ARGV: token, lease in ms, max value bytes, '1' to look at the value first,
--       '1' to take the lock only if it is free (single flight), '0' to take it anyway.
-- Replies:
--   {1, value}          the value is stored (and no larger than max value bytes)
--   {2, replaced, epoch} token now holds the lock; replaced = 1 if a foreign lock was removed;
--                       epoch: the namespace's epoch now ('' when no clear runs)
--   {3, pttl, marked}   another computation holds the lock for pttl more ms; marked = 1 if
--                       the function's results were lately found uncacheable
--   {4, size}           the stored value is larger than max value bytes (it was not read)
--   {5}                 the value's name holds something that is not a string
if ARGV[4] == '1' then
  local size = redis.pcall('STRLEN', KEYS[1])
  if type(size) == 'table' then return {5} end
  if size > tonumber(ARGV[3]) then return {4, size} end
  if size > 0 then return {1, redis.call('GET', KEYS[1])} end
end
local replaced = 0
local ttl = redis.call('PTTL', KEYS[2])
-- A lock never lives without expiry, and always holds a string: anything else was written by
-- something else, and would block every caller for ever.
if ttl == -1 or (ttl > 0 and redis.call('TYPE', KEYS[2])['ok'] ~= 'string') then
  redis.call('DEL', KEYS[2])
  replaced = 1
end
local epoch = redis.call('GET', KEYS[4]) or ''
if ARGV[5] == '1' then
  if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {2, replaced, epoch} end
  return {3, redis.call('PTTL', KEYS[2]), redis.call('EXISTS', KEYS[3])}
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return {2, replaced, epoch}
"""

RENEW: Final = """
-- KEYS: lock. ARGV: token, lease in ms. Extends the lease only if token still holds the lock;
-- returns 1 if it did, else 0.
if redis.pcall('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

FINISH: Final = """
-- KEYS: value, lock, marker, epoch.
-- ARGV: token, outcome ('s': store the computed value; 'u': uncacheable, mark the function;
--       'n': nothing to store; 'p': store a primed value), value, ttl in ms (0: none), channel,
--       message, marker lifetime in ms, the namespace's epoch when the lock was taken,
--       '1' if an earlier attempt of this same finish may have run already.
-- 'p' stores whoever holds the lock, deletes the lock (so that the computation under way does
-- not overwrite the primed value), announces message and returns 1.
-- Otherwise, if token holds the lock and no clear runs that began after the lock was taken (the
-- epoch is unset, or the one the lock was taken under): stores per outcome, deletes the lock,
-- announces message on channel and returns 1. If token holds the lock but such a clear runs:
-- stores nothing, deletes the lock, announces 'x' (the waiters look again) and returns 0. If
-- token does not hold it: stores nothing and returns 2 if the value stored is this very value
-- (an earlier attempt ran), else 0 (the lock was lost); a lost lock that nobody holds now
-- (flushed, evicted, expired) is announced as 'x', so that the waiters look again at once
-- instead of sleeping out the lease they last saw.
local store = ARGV[2] == 's' or ARGV[2] == 'p'
if ARGV[2] == 'u' then
  redis.call('SET', KEYS[3], '1', 'PX', ARGV[7])
end
if ARGV[2] ~= 'p' then
  if redis.pcall('GET', KEYS[2]) ~= ARGV[1] then
    if ARGV[9] == '1' and store and redis.pcall('GET', KEYS[1]) == ARGV[3] then
      return 2
    end
    if redis.call('EXISTS', KEYS[2]) == 0 then
      redis.call('PUBLISH', ARGV[5], 'x')
    end
    return 0
  end
  local epoch = redis.call('GET', KEYS[4])
  if epoch and epoch ~= ARGV[8] then
    redis.call('DEL', KEYS[2])
    redis.call('PUBLISH', ARGV[5], 'x')
    return 0
  end
end
if store then
  if tonumber(ARGV[4]) > 0 then
    redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
  else
    redis.call('SET', KEYS[1], ARGV[3])
  end
  redis.call('DEL', KEYS[3])
end
redis.call('DEL', KEYS[2])
redis.call('PUBLISH', ARGV[5], ARGV[6])
return 1
"""

DELETE: Final = """
-- KEYS: value, lock. ARGV: channel. Removes the value and the lock, so that a computation under
-- way cannot store its result, and wakes the waiters (to compute afresh). Returns whether a
-- value was removed.
local removed = redis.call('DEL', KEYS[1])
if redis.call('DEL', KEYS[2]) == 1 then
  redis.call('PUBLISH', ARGV[1], 'x')
end
return removed
"""

CLEARED: Final = """
-- KEYS: epoch. ARGV: the epoch a clear set as it began. At its end, the clear removes the epoch
-- (every lock taken before it is gone by then), unless a later clear has set another. Returns
-- whether it removed it.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
