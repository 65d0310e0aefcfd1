"""One canary shared by several processes through Redis (``pip install 'inferkit-serve[redis]'``).

Every ``inferkit serve`` process behind a load balancer builds the same :class:`~inferkit.Canary`
with a :class:`RedisStore` on the same URL and key. Then:

- **One decision.** A decision is a compare-and-set on the state's revision (a Lua script, so
  atomic in Redis): of two processes that decide at once, one wins and the other adopts the
  winner's state. A candidate is never promoted or rolled back twice.
- **Followed within a second.** A thread per store reads the state every ``poll_s`` (0.25 s)
  and adopts a newer revision.
- **Pooled counts.** Each process adds its requests and failures per arm to a hash of the
  current step on the same thread, and the guard judges the sum: it sees all the candidate's
  traffic. Each batch is added once, even when a call that timed out ran after all (a slow
  Redis): it is sent again unchanged, with its number. Latency quantiles stay per process.
- **An outage never stops serving.** Calls time out after ``timeout_s``; while Redis cannot be
  reached the canary keeps its last known weights, makes no decision, logs a warning once, and
  ``inferkit_canary_store_up`` is 0. Manual control answers 503 meanwhile (a rollback still
  takes effect in the process asked, and is saved once Redis is back).
- **A foreign state never breaks serving.** A state under the key that is not valid, or is of
  another rollout (a rolling deploy of the next canary on the same key), is never taken nor
  overwritten: the canary holds its weights as in an outage, says why in its status, and
  follows again once the key holds a valid state of its rollout. A value that is not UTF-8 is
  such a state; one of another type or over 1 MiB too, refused in Redis before it is read. A
  count field that is not a count freezes it the same way, and nothing is added to the counts.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import redis

from inferkit.policies import StoreUnavailable
from inferkit.policies.state import decode_state

if TYPE_CHECKING:
    from inferkit.policies import Canary

__all__ = ["RedisStore"]

# Refuse, before reading it, a value under KEYS[1] that cannot be a state: another type, or one so big
# that reading it on every poll would take the serving process's CPU and memory (a foreign write).
_CHECK = """
local function refuse(limit)
  local kind = redis.call('TYPE', KEYS[1])['ok']
  if kind ~= 'none' and kind ~= 'string' then
    return redis.error_reply('NOTSTATE does not hold a string: it holds a ' .. kind)
  end
  local size = redis.call('STRLEN', KEYS[1])
  if size > tonumber(limit) then
    return redis.error_reply('NOTSTATE holds ' .. size .. ' bytes, more than any canary state (' .. limit .. ')')
  end
  return nil
end
"""
_NOT_STATE = "NOTSTATE "
# The saved state (ARGV[1] bytes at most), or nil.
_READ = (
    _CHECK
    + """
local refused = refuse(ARGV[1])
if refused then
  return refused
end
return redis.call('GET', KEYS[1])
"""
)
# Save ARGV[2] if the saved revision is ARGV[1] (or nothing is saved); else return what is saved,
# which is never overwritten when it is not a JSON object with that revision (ARGV[3]: the size limit).
_TRANSITION = (
    _CHECK
    + """
local refused = refuse(ARGV[3])
if refused then
  return refused
end
local saved = redis.call('GET', KEYS[1])
if saved then
  local ok, state = pcall(cjson.decode, saved)
  if not ok or type(state) ~= 'table' or tonumber(state['revision']) ~= tonumber(ARGV[1]) then
    return saved
  end
end
redis.call('SET', KEYS[1], ARGV[2])
return false
"""
)
# Add a batch of counts once, however often it is sent: a call that timed out may still have run.
# KEYS[1] holds the number of this store's last batch added, KEYS[2..] are count hashes; ARGV[1] is
# the batch's number, ARGV[2] the TTL, then (index into KEYS, field, increment) per count. A hash of
# another type adds nothing (a script is not rolled back halfway).
_ADD_ONCE = """
local last = tonumber(redis.call('GET', KEYS[1]))
if last and last >= tonumber(ARGV[1]) then
  return 0
end
for i = 2, #KEYS do
  local kind = redis.call('TYPE', KEYS[i])['ok']
  if kind ~= 'none' and kind ~= 'hash' then
    return redis.error_reply('WRONGTYPE ' .. KEYS[i] .. ' holds a ' .. kind .. ', not counts')
  end
end
-- Every field first: one HINCRBY failing halfway left the earlier ones added, again on every resend.
-- A count as HINCRBY reads one: '0' or no leading zero ('007' passed '^%d+$' and failed HINCRBY).
for i = 3, #ARGV, 3 do
  local value = redis.call('HGET', KEYS[tonumber(ARGV[i])], ARGV[i + 1])
  if value and value ~= '0' and (#value > 18 or not string.match(value, '^[1-9]%d*$')) then
    return redis.error_reply('NOTCOUNT ' .. KEYS[tonumber(ARGV[i])] .. ' holds a field that is not a count')
  end
end
for i = 3, #ARGV, 3 do
  redis.call('HINCRBY', KEYS[tonumber(ARGV[i])], ARGV[i + 1], ARGV[i + 2])
end
for i = 2, #KEYS do
  redis.call('EXPIRE', KEYS[i], ARGV[2])
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 1
"""
_COUNTS_TTL_S = 7 * 24 * 3600  # a step's counts outlive any step worth running, then go
_MAX_STATE_BYTES = 2**20  # a state keeps 100 decisions: tens of kB; more is not one, and is not read


class RedisStore:
    """A :class:`~inferkit.policies.CanaryStore` in Redis at ``url``, under ``key`` (one per canary).

    ``poll_s`` is how often the state is read and the counts are pooled; ``timeout_s`` bounds
    every Redis call, so a request that makes a decision waits at most that long.
    """

    pooled = True

    def __init__(self, url: str, key: str, *, poll_s: float = 0.25, timeout_s: float = 0.5) -> None:
        if not 0 < poll_s <= 1:
            msg = f"poll_s must be in (0, 1] (processes follow within a second), got {poll_s!r}"
            raise ValueError(msg)
        if not timeout_s > 0:
            msg = f"timeout_s must be > 0, got {timeout_s!r}"
            raise ValueError(msg)
        self.url = url
        self.key = key
        self.poll_s = poll_s
        self._client: Any = redis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            decode_responses=True,
            encoding_errors="replace",  # bytes that are not UTF-8 (a foreign write) are no state, not an outage
        )
        self._read = self._client.register_script(_READ)
        self._transition = self._client.register_script(_TRANSITION)
        self._add_once = self._client.register_script(_ADD_ONCE)
        self._counts = _Counts()
        self._reachable = True
        self._canary: Canary | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _counts_key(self, epoch: int) -> str:
        return f"{self.key}:counts:{epoch}"

    def load(self) -> Mapping[str, Any] | None:
        """The saved state, or None."""
        try:
            text = self._read(keys=[self.key], args=[_MAX_STATE_BYTES])
        except redis.RedisError as error:
            raise self._refused(error) from error
        return None if text is None else self._decode(text)

    def _decode(self, text: str) -> dict[str, Any]:
        return decode_state(text, f"Redis key {self.key!r} at {self.url}")

    def _refused(self, error: redis.RedisError) -> Exception:
        """``ValueError`` when a script refused the value under the key as a state, else ``StoreUnavailable``."""
        if isinstance(error, redis.ResponseError) and str(error).startswith(_NOT_STATE):
            return ValueError(f"Redis key {self.key!r} at {self.url} {str(error).removeprefix(_NOT_STATE)}")
        return StoreUnavailable(f"cannot reach Redis at {self.url}: {error}")

    def transition(self, expected: int, state: Mapping[str, Any]) -> Mapping[str, Any] | None:
        """The atomic compare-and-set on the revision; the winner's state when another process won."""
        if not self._reachable:  # known down: no request waits on a timeout; the thread probes
            msg = f"Redis at {self.url} cannot be reached"
            raise StoreUnavailable(msg)
        try:
            saved = self._transition(keys=[self.key], args=[expected, json.dumps(state), _MAX_STATE_BYTES])
        except redis.RedisError as error:
            refused = self._refused(error)
            if isinstance(refused, StoreUnavailable):
                self._set_reachable(error)
            raise refused from error
        return None if saved is None else self._decode(saved)

    def count(self, epoch: int, arm: str, *, failed: bool) -> None:
        """Add one request to the counts the thread sends to Redis next."""
        self._counts.count(epoch, arm, failed=failed)

    def totals(self, epoch: int) -> Mapping[str, tuple[int, int]]:
        """Every process's counts as last read, plus this process's not yet sent."""
        return self._counts.totals(epoch)

    def attach(self, canary: Canary) -> None:
        """Start following: a daemon thread pools counts and adopts newer states every ``poll_s``."""
        self._canary = canary
        self._thread = threading.Thread(target=self._follow, name=f"inferkit-canary-{self.key}", daemon=True)
        self._thread.start()

    def sync(self) -> None:
        """Send this process's counts, read every process's, adopt a newer state; then let the canary decide."""
        canary = self._canary
        if canary is None:
            return
        number, batch = self._counts.batch()
        epoch = canary.snapshot()["epoch"]
        try:
            pipe = self._client.pipeline(transaction=False)
            if batch:
                self._send(pipe, number, batch)
            self._read(keys=[self.key], args=[_MAX_STATE_BYTES], client=pipe)
            fields = [f"{arm}:{kind}" for arm in (canary.baseline, canary.candidate) for kind in ("n", "failed")]
            pipe.hmget(self._counts_key(epoch), fields)  # the four fields only: a foreign hash may be huge
            *added, text, counts = pipe.execute(raise_on_error=False)
            failed = next((r for r in (*added, counts) if isinstance(r, redis.RedisError)), None)
            if failed is not None:  # a key of another type: counts cannot be pooled (they stay unsent)
                raise failed
        except redis.RedisError as error:
            self._set_reachable(error)
            return
        try:
            numbers = [_count(value, self._counts_key(epoch)) for value in counts]
        except ValueError as error:  # counts spoiled by a foreign write: follow the state, decide nothing
            self._set_reachable(error)
        else:  # (judged before saying Redis is back, so a spoiled count is not logged twice per poll)
            self._set_reachable(None)
            baseline, candidate = (numbers[0], numbers[1]), (numbers[2], numbers[3])
            self._counts.added(epoch, {canary.baseline: baseline, canary.candidate: candidate})
        state: object
        if isinstance(text, redis.RedisError):
            refused = self._refused(text)
            state = refused if isinstance(refused, ValueError) else ValueError(f"Redis key {self.key!r}: {text}")
        else:
            try:
                state = None if text is None else self._decode(text)
            except ValueError as error:
                state = error
        canary.follow(state)  # never raises: a foreign or broken state freezes the canary
        canary.evaluate()

    def _send(self, pipe: Any, number: int, batch: Mapping[tuple[int, str], list[int]]) -> None:
        keys = [self._counts.added_key(self.key), *{self._counts_key(epoch): None for epoch, _ in batch}]
        args: list[Any] = [number, _COUNTS_TTL_S]
        for (epoch, arm), (n, failed) in batch.items():
            at = keys.index(self._counts_key(epoch)) + 1  # Lua counts from 1
            args += [at, f"{arm}:n", n, at, f"{arm}:failed", failed]
        self._add_once(keys=keys, args=args, client=pipe)

    def _set_reachable(self, error: BaseException | None) -> None:
        self._reachable = error is None
        if self._canary is not None:
            self._canary.store_failed(error)

    def _follow(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.sync()
            except Exception as error:  # noqa: BLE001 (a bad state in Redis must not end following)
                self._set_reachable(error)

    def close(self) -> None:
        """Stop the thread and close the connections; idempotent."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=5.0)
        self._client.close()

    def __repr__(self) -> str:
        return f"RedisStore({self.url!r}, {self.key!r})"


def _count(value: str | None, key: str) -> int:
    """A pooled count as read (absent: 0); ``ValueError`` for what another client wrote that is not one."""
    if value is None:
        return 0
    # As the adding script judges it ('0', or up to 18 digits with no leading 0), so both refuse the same fields.
    if value != "0" and not (len(value) <= 18 and value.isascii() and value.isdigit() and value[0] != "0"):
        msg = f"Redis key {key!r} holds a field that is not a count"
        raise ValueError(msg)
    return int(value)


class _Counts:
    """A process's requests and failures per (epoch, arm), and every process's as last read.

    Those not yet sent, and the batch sent but not known to be added (sent again unchanged, with
    its number, until it is).
    """

    def __init__(self) -> None:
        self._id = uuid.uuid4().hex
        self._lock = threading.Lock()
        self._pending: dict[tuple[int, str], list[int]] = {}  # (epoch, arm) -> [n, failed]
        self._number = 0
        self._unsent: dict[tuple[int, str], list[int]] = {}  # batch ``_number``
        self._totals: dict[int, dict[str, tuple[int, int]]] = {}  # last read from Redis, by epoch

    def added_key(self, key: str) -> str:
        """The key that holds the number of this process's last batch added."""
        return f"{key}:added:{self._id}"

    def count(self, epoch: int, arm: str, *, failed: bool) -> None:
        with self._lock:
            pending = self._pending.setdefault((epoch, arm), [0, 0])
            pending[0] += 1
            pending[1] += failed

    def totals(self, epoch: int) -> dict[str, tuple[int, int]]:
        with self._lock:
            totals = dict(self._totals.get(epoch, {}))
            for (at, arm), (n, failed) in (*self._pending.items(), *self._unsent.items()):
                if at == epoch:
                    requests, failures = totals.get(arm, (0, 0))
                    totals[arm] = (requests + n, failures + failed)
        return totals

    def batch(self) -> tuple[int, dict[tuple[int, str], list[int]]]:
        """The batch to send and its number: the last one, unchanged, until it is known added."""
        with self._lock:
            if not self._unsent and self._pending:
                self._number += 1
                self._unsent, self._pending = self._pending, {}
            return self._number, self._unsent

    def added(self, epoch: int, arms: dict[str, tuple[int, int]]) -> None:
        """The batch is added (or was empty); ``arms`` are every process's counts of ``epoch`` as read after it."""
        with self._lock:
            self._unsent = {}
            self._totals = {epoch: arms}
