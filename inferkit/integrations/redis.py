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
  follows again once the key holds a valid state of its rollout.
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

# Save ARGV[2] if the saved revision is ARGV[1] (or nothing is saved); else return what is saved,
# which is never overwritten when it is not a JSON object with that revision.
_TRANSITION = """
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
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, decode_responses=True
        )
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
            text = self._client.get(self.key)
        except redis.RedisError as error:
            msg = f"cannot reach Redis at {self.url}: {error}"
            raise StoreUnavailable(msg) from error
        return None if text is None else self._decode(text)

    def _decode(self, text: str) -> dict[str, Any]:
        return decode_state(text, f"Redis key {self.key!r} at {self.url}")

    def transition(self, expected: int, state: Mapping[str, Any]) -> Mapping[str, Any] | None:
        """The atomic compare-and-set on the revision; the winner's state when another process won."""
        if not self._reachable:  # known down: no request waits on a timeout; the thread probes
            msg = f"Redis at {self.url} cannot be reached"
            raise StoreUnavailable(msg)
        try:
            saved = self._transition(keys=[self.key], args=[expected, json.dumps(state)])
        except redis.RedisError as error:
            self._set_reachable(error)
            msg = f"cannot reach Redis at {self.url}: {error}"
            raise StoreUnavailable(msg) from error
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
            pipe.get(self.key)
            pipe.hgetall(self._counts_key(epoch))
            *added, text, counts = pipe.execute(raise_on_error=False)
            failed = next((r for r in (*added, counts) if isinstance(r, redis.RedisError)), None)
            if failed is not None:  # a key of another type: counts cannot be pooled (they stay unsent)
                raise failed
        except redis.RedisError as error:
            self._set_reachable(error)
            return
        self._set_reachable(None)
        arms: dict[str, tuple[int, int]] = {}
        for arm in (canary.baseline, canary.candidate):
            arms[arm] = (int(counts.get(f"{arm}:n", 0)), int(counts.get(f"{arm}:failed", 0)))
        self._counts.added(epoch, arms)
        state: object
        if isinstance(text, redis.RedisError):
            state = ValueError(f"Redis key {self.key!r} at {self.url} does not hold a string: {text}")
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
