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
  traffic. Latency quantiles stay per process.
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
        self._lock = threading.Lock()
        self._pending: dict[tuple[int, str], list[int]] = {}  # not yet added to Redis: (epoch, arm) -> [n, failed]
        self._totals: dict[int, dict[str, tuple[int, int]]] = {}  # last read from Redis, by epoch
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
        with self._lock:
            pending = self._pending.setdefault((epoch, arm), [0, 0])
            pending[0] += 1
            pending[1] += failed

    def totals(self, epoch: int) -> Mapping[str, tuple[int, int]]:
        """Every process's counts as last read, plus this process's not yet sent."""
        with self._lock:
            totals = dict(self._totals.get(epoch, {}))
            for (at, arm), (n, failed) in self._pending.items():
                if at == epoch:
                    requests, failures = totals.get(arm, (0, 0))
                    totals[arm] = (requests + n, failures + failed)
        return totals

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
        with self._lock:
            pending, self._pending = self._pending, {}
        try:
            pipe = self._client.pipeline(transaction=False)
            for (epoch, arm), (n, failed) in pending.items():
                pipe.hincrby(self._counts_key(epoch), f"{arm}:n", n)
                pipe.hincrby(self._counts_key(epoch), f"{arm}:failed", failed)
                pipe.expire(self._counts_key(epoch), _COUNTS_TTL_S)
            pipe.get(self.key)
            epoch = canary.snapshot()["epoch"]
            pipe.hgetall(self._counts_key(epoch))
            *_, text, counts = pipe.execute()
        except redis.RedisError as error:
            with self._lock:  # keep them for the next try: counts are not lost to a blip
                for where, (n, failed) in pending.items():
                    mine = self._pending.setdefault(where, [0, 0])
                    mine[0] += n
                    mine[1] += failed
            self._set_reachable(error)
            return
        self._set_reachable(None)
        arms: dict[str, tuple[int, int]] = {}
        for arm in (canary.baseline, canary.candidate):
            arms[arm] = (int(counts.get(f"{arm}:n", 0)), int(counts.get(f"{arm}:failed", 0)))
        with self._lock:
            self._totals = {epoch: arms}
        try:
            state: object = None if text is None else self._decode(text)
        except ValueError as error:
            state = error
        canary.follow(state)  # never raises: a foreign or broken state freezes the canary
        canary.evaluate()

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
