"""A canary's store going wrong: a new rollout on a used key, a foreign or broken state, a store that fails."""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from test_canary_shared import RedisServer, _until, needs_redis

from inferkit.integrations.redis import RedisStore
from inferkit.policies import Canary, CanaryState, Feedback, FileStore, Guard, StoreUnavailable


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


class TestArguments:
    """A canary's arguments are checked at construction, with the field named."""

    @pytest.mark.parametrize(
        ("kwargs", "field"),
        [
            ({"min_seconds_per_step": math.nan}, "min_seconds_per_step"),
            ({"min_seconds_per_step": -5}, "min_seconds_per_step"),
            ({"min_requests_per_step": 2.5}, "min_requests_per_step"),
            ({"min_requests_per_step": True}, "min_requests_per_step"),
            ({"steps": (0.5, 0.5)}, "steps"),
            ({"steps": (0.5, math.nan)}, "steps"),
        ],
    )
    def test_bad_arguments_are_refused(self, kwargs: dict[str, Any], field: str) -> None:
        """NaN, negative, fractional or boolean values and repeated steps fail with a ValueError naming the field."""
        with pytest.raises(ValueError, match=field):
            Canary("v1", "v2", **kwargs)


_GOOD = {
    "baseline": "v1",
    "candidate": "v2",
    "steps": [0.1, 1.0],
    "state": "running",
    "step": 0,
    "weight": 0.1,
    "revision": 3,
    "epoch": 1,
    "history": [],
    "decisions": {},
}


class TestSavedStateAtConstruction:
    """A saved state of this rollout that is not valid stops construction with the field named."""

    @pytest.mark.parametrize(
        ("text", "match"),
        [
            ("", "not JSON"),
            (json.dumps(_GOOD)[:40], "not JSON"),
            ("[1, 2]", "not an object"),
            (json.dumps(_GOOD | {"state": "bogus"}), "state must be one of"),
            (json.dumps(_GOOD | {"weight": 7.0}), "weight must be 0.1"),
            (json.dumps(_GOOD | {"weight": math.nan}), "weight must be 0.1"),
            (json.dumps(_GOOD | {"step": 99}), "step must be < 2"),
            (json.dumps(_GOOD | {"step": -1, "weight": 0.5}), "step must be an int >= 0"),
            (json.dumps(_GOOD | {"revision": "x"}), "revision must be an int >= 0"),
        ],
    )
    def test_an_invalid_state_is_refused(self, tmp_path: Path, text: str, match: str) -> None:
        """Truncated, empty or out-of-range states raise a ValueError that names the file and the field."""
        path = tmp_path / "canary.json"
        path.write_text(text)
        with pytest.raises(ValueError, match=match) as raised:
            Canary("v1", "v2", (0.1, 1.0), store=FileStore(path))
        assert str(path) in str(raised.value)

    def test_a_valid_state_is_taken(self, tmp_path: Path) -> None:
        """The same state with valid fields resumes its step."""
        path = tmp_path / "canary.json"
        path.write_text(json.dumps(_GOOD | {"step": 1, "weight": 1.0}))
        canary = Canary("v1", "v2", (0.1, 1.0), store=FileStore(path))
        assert (canary.step, canary.weight, canary.snapshot()["revision"]) == (1, 1.0, 3)


@contextlib.contextmanager
def _broken_directory(directory: Path) -> Iterator[None]:
    """The state file's directory unwritable (a file stands in its place), then mended."""
    aside = directory.with_name(directory.name + ".aside")
    directory.replace(aside)
    directory.write_text("not a directory")
    try:
        yield
    finally:
        directory.unlink()
        aside.replace(directory)


class TestFileStoreFailure:
    """A FileStore that fails a write is tried again; a manual rollback holds whatever the disk does."""

    def test_decisions_resume_once_the_file_can_be_written(self, tmp_path: Path) -> None:
        """A step decision that cannot be saved keeps the weight; once the disk is back the canary moves on."""
        path = tmp_path / "state" / "canary.json"
        canary = Canary("v1", "v2", (0.5, 1.0), min_requests_per_step=5, store=FileStore(path))
        with _broken_directory(path.parent):
            _served(canary, "v2", 10)
            assert (canary.state, canary.weight, canary.store_ok) == (CanaryState.RUNNING, 0.5, False)
            assert "cannot write" in canary.status()["store"]["error"]
        _until(lambda: (_served(canary, "v2", 1), canary.weight == 1.0)[1], "the step taken once the disk is back", 5)
        assert canary.store_ok
        assert json.loads(path.read_text())["weight"] == 1.0

    def test_a_manual_rollback_takes_effect_while_the_file_cannot_be_written(self, tmp_path: Path) -> None:
        """rollback() stops the candidate's traffic at once, says it is unsaved, and is saved once the disk is back."""
        path = tmp_path / "state" / "canary.json"
        canary = Canary("v1", "v2", (0.5, 1.0), min_requests_per_step=5, store=FileStore(path))
        with _broken_directory(path.parent):
            with pytest.raises(StoreUnavailable, match="rolled back in this process only"):
                canary.rollback()
            assert (canary.state, canary.weight) == (CanaryState.ROLLED_BACK, 0.0)
            assert canary.route(0.0, {}).arm == "v1"
            assert canary.status()["store"]["unsaved"] is True
            with pytest.raises(StoreUnavailable):
                canary.rollback()  # asked again: still unsaved, still in force
        _until(lambda: (_served(canary, "v1", 1), not canary.status()["store"]["unsaved"])[1], "the rollback saved", 5)
        assert canary.store_ok
        assert canary.snapshot()["decisions"] == {"rollback": 1}
        again = Canary("v1", "v2", (0.5, 1.0), min_requests_per_step=5, store=FileStore(path))
        assert (again.state, again.weight) == (CanaryState.ROLLED_BACK, 0.0)


@needs_redis
class TestForeignState:
    """A state under the key that is invalid or another rollout's never raises: the canary freezes, then follows."""

    def test_an_invalid_newer_state_freezes_then_a_valid_one_is_followed(self, redis_server: RedisServer) -> None:
        """A 'bogus' state freezes the weight through a due step; a valid newer state is followed again."""
        store = RedisStore(redis_server.url, "t:bogus", poll_s=0.05)
        canary = Canary("v1", "v2", (0.5, 1.0), min_requests_per_step=5, store=store)
        client = redis.Redis.from_url(redis_server.url, decode_responses=True)
        try:
            saved = json.loads(client.get("t:bogus") or "{}")
            client.set("t:bogus", json.dumps(saved | {"revision": saved["revision"] + 5, "state": "bogus"}))
            _until(lambda: not canary.store_ok, "the bogus state seen", 5)
            _served(canary, "v2", 10)  # a due step: neither raises nor moves
            assert (canary.state, canary.weight) == (CanaryState.RUNNING, 0.5)
            assert "bogus" in canary.status()["store"]["error"]
            assert json.loads(client.get("t:bogus") or "{}")["state"] == "bogus"  # never overwritten
            client.set("t:garbage", "{")
            client.set("t:bogus", "not json {")
            _until(lambda: "not JSON" in str(canary.status()["store"]["error"]), "the garbage seen", 5)
            _served(canary, "v2", 3)
            valid = saved | {"revision": saved["revision"] + 9, "state": "paused"}
            client.set("t:bogus", json.dumps(valid))
            _until(lambda: canary.store_ok and canary.state is CanaryState.PAUSED, "the valid state followed", 5)
        finally:
            canary.close()

    def test_a_rolling_deploy_of_the_next_rollout_freezes_the_old_processes(self, redis_server: RedisServer) -> None:
        """Old v1 -> v2 canaries keep their weight when v2 -> v3 takes the key, and never raise into a request."""
        old = Canary("v1", "v2", (0.5, 1.0), min_requests_per_step=5, store=RedisStore(redis_server.url, "t:deploy"))
        new = Canary("v2", "v3", (0.5, 1.0), min_requests_per_step=5, store=RedisStore(redis_server.url, "t:deploy"))
        try:
            _served(old, "v2", 10)  # its step decision loses to the new rollout's state: no ValueError
            assert (old.state, old.weight, old.store_ok) == (CanaryState.RUNNING, 0.5, False)
            assert "'v2' -> 'v3'" in old.status()["store"]["error"]
            with pytest.raises(StoreUnavailable):
                old.promote()
            _served(new, "v3", 5)
            assert new.weight == 1.0  # the new rollout goes on undisturbed
        finally:
            old.close()
            new.close()

    def test_a_frozen_canary_never_writes_over_another_rollouts_state(self, redis_server: RedisServer) -> None:
        """After a flush, a new rollout saved its revision 1, the old canary's revision too: the old one,
        frozen, still stepped (and rolled back) over it, the compare-and-set seeing only the revision."""
        old = Canary(
            "a", "b", (0.1, 0.5, 1.0), min_requests_per_step=5, store=RedisStore(redis_server.url, "t:k", poll_s=0.05)
        )
        client = redis.Redis.from_url(redis_server.url, decode_responses=True)
        client.delete("t:k")  # a Redis restarted without persistence
        new = Canary("a", "c", (0.1, 0.5, 1.0), min_requests_per_step=10**6, store=RedisStore(redis_server.url, "t:k"))
        try:
            _until(lambda: not old.store_ok, "the new rollout's state seen", 5)
            _served(old, "b", 20)  # steps due: not written
            with pytest.raises(StoreUnavailable, match="rolled back in this process only"):
                old.rollback()
            _served(old, "b", 5)  # the unsaved rollback is tried again: still not written
            saved = json.loads(client.get("t:k") or "{}")
            assert (saved["candidate"], saved["state"], saved["revision"]) == ("c", "running", 1)
            assert (old.weight, new.store_ok) == (0.0, True)
        finally:
            old.close()
            new.close()
