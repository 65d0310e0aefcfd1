"""A canary's store going wrong: a new rollout on a used key, a foreign or broken state, a store that fails."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis
from test_canary_shared import RedisServer, _until, needs_redis

from inferkit.integrations.redis import RedisStore
from inferkit.policies import Canary, CanaryState, Feedback, Guard


@pytest.fixture(name="redis_server")
def _redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.stop()


def _served(canary: Canary, arm: str, n: int, *, failed: bool = False) -> None:
    for _ in range(n):
        canary.feedback(Feedback("served", arm, time.monotonic(), latency_s=0.001, failed=failed))


@needs_redis
class TestNewRollout:
    """A new rollout on a key an earlier rollout used starts from nothing."""

    def test_a_new_rollout_does_not_inherit_the_previous_counts(self, redis_server: RedisServer) -> None:
        """Rollout 2 (another steps list) on the key of a rolled-back rollout 1 judges only its own requests."""
        guard = Guard(max_error_rate=0.01)
        first = Canary(
            "v1", "v2", (0.5, 1.0), min_requests_per_step=100, guard=guard, store=RedisStore(redis_server.url, "t:new")
        )
        try:
            _served(first, "v2", 2, failed=True)
            assert first.state is CanaryState.ROLLED_BACK
            counts = f"t:new:counts:{first.snapshot()['epoch']}"
            client = redis.Redis.from_url(redis_server.url, decode_responses=True)
            _until(lambda: client.hget(counts, "v2:failed") == "2", "rollout 1's failures pooled", 5)
        finally:
            first.close()
        store = RedisStore(redis_server.url, "t:new")
        second = Canary("v1", "v2", (0.1, 0.5, 1.0), min_requests_per_step=100, guard=guard, store=store)
        try:
            assert second.snapshot()["epoch"] != first.snapshot()["epoch"]
            store.sync()  # read the pooled counts of its step now, not in a poll's time
            _served(second, "v2", 1)
            assert (second.state, second.weight) == (CanaryState.RUNNING, 0.1)
        finally:
            second.close()
