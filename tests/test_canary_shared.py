"""One canary shared by several processes through a real ``redis-server`` on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
import redis
from onnx import TensorProto, helper
from test_server_run import _model, _start_cli

from inferkit.integrations.redis import RedisStore
from inferkit.policies import Canary, CanaryState, Feedback, Guard, StoreUnavailable

WAIT = 30  # seconds: a bound on every wait, never expected to be reached
TOKEN = "an-operator-token-of-some-length"
AUTH = {"authorization": f"Bearer {TOKEN}"}

needs_redis = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="needs redis-server (.ci/run installs it)"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A ``redis-server`` on a free port of 127.0.0.1, without persistence."""

    def __init__(self, *options: str) -> None:
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.options = options

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                *self.options,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        try:
            deadline = time.monotonic() + WAIT
            while True:  # the server says when it listens only in its log: ask it
                try:
                    if client.ping():
                        return self
                except redis.ConnectionError:
                    if time.monotonic() > deadline or self.proc.poll() is not None:
                        raise
                time.sleep(0.02)
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(WAIT)
            self.proc = None


@pytest.fixture(name="redis_server")
def _redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.stop()


def _until(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Wait (bounded) for a condition another process or thread makes true."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


@needs_redis
class TestStore:
    """Two canaries on one key behave as one."""

    def test_one_rollback_pooled_and_followed(self, redis_server: RedisServer) -> None:
        """Failures seen by two canaries add up in the guard; one rollback, which the other follows within a second."""
        guard = Guard(max_error_rate=0.2)

        def canary() -> Canary:
            store = RedisStore(redis_server.url, "t:shared", poll_s=0.05)
            return Canary("v1", "v2", (0.5, 1.0), min_requests_per_step=20, guard=guard, store=store)

        a, b = canary(), canary()
        try:
            # 3 failures each: neither alone passes 0.2 * 20 = 4, together (6) they do.
            for c in (a, b):
                for _ in range(3):
                    c.feedback(Feedback("served", "v2", time.monotonic(), latency_s=0.001, failed=True))
            _until(lambda: a.state is b.state is CanaryState.ROLLED_BACK, "both canaries rolled back", 5)
            for c in (a, b):
                assert c.snapshot()["decisions"] == {"rollback": 1}
                assert [d["action"] for d in c.snapshot()["history"]] == ["rollback"]
        finally:
            a.close()
            b.close()

    def test_outage_keeps_the_weights_and_says_so(
        self, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
    ) -> None:
        """With Redis gone the canary routes on its last weight, decides nothing and logs why, once."""
        guard = Guard(max_error_rate=0.1)
        store = RedisStore(redis_server.url, "t:outage", poll_s=0.05, timeout_s=0.2)
        canary = Canary("v1", "v2", (0.5, 1.0), min_requests_per_step=10, guard=guard, store=store)
        try:
            with caplog.at_level(logging.WARNING, logger="inferkit"):
                redis_server.stop()
                _until(lambda: not canary.store_ok, "the store seen down", 5)
                for _ in range(10):
                    canary.feedback(Feedback("served", "v2", time.monotonic(), latency_s=0.001, failed=True))
                assert (canary.state, canary.weight) == (CanaryState.RUNNING, 0.5)
                assert canary.route(0.4, {}).arm == "v2"
                with pytest.raises(StoreUnavailable):
                    canary.promote()
            warnings = [r.getMessage() for r in caplog.records if "store unreachable" in r.getMessage()]
            assert len(warnings) == 1
            assert "keeping the last known weight 0.5" in warnings[0]
        finally:
            canary.close()

    def test_counts_are_added_once_when_redis_answers_late(self) -> None:
        """Counts whose call timed out on the client were still added once Redis woke up, then sent again:
        every request counted during a slow second was counted twice in the sum the guard judges."""
        server = RedisServer("--enable-debug-command", "local").start()  # for DEBUG SLEEP, off by default
        store = RedisStore(server.url, "t:late", poll_s=0.25, timeout_s=0.5)
        canary = Canary("v1", "v2", (0.5, 1.0), min_requests_per_step=10_000, store=store)
        client = redis.Redis.from_url(server.url, decode_responses=True)
        key = f"t:late:counts:{canary.snapshot()['epoch']}"
        try:
            _serve(canary, 10)
            _until(lambda: client.hget(key, "v2:n") == "10", "the first counts added", 5)
            sleeping = threading.Thread(target=client.execute_command, args=("DEBUG", "SLEEP", 2.0))
            sleeping.start()
            time.sleep(0.1)  # asleep before the counts are taken
            _serve(canary, 10)
            _until(lambda: not canary.store_ok, "a call timed out", 5)
            sleeping.join(WAIT)
            _until(lambda: canary.store_ok, "the store back", 5)
            time.sleep(0.3)  # several syncs
            assert client.hget(key, "v2:n") == "20"
            assert store.totals(canary.snapshot()["epoch"])["v2"] == (20, 0)
        finally:
            canary.close()
            client.close()
            server.stop()

    def test_a_foreign_value_under_the_key_neither_breaks_nor_inflates_the_counts(
        self, redis_server: RedisServer
    ) -> None:
        """A hash under the state's key failed the pipeline after the counts were added: they were sent again on
        every poll (doubling without end), and the store called unreachable. Now the canary holds as for any
        foreign state, and each count is added once."""
        store = RedisStore(redis_server.url, "t:foreign", poll_s=0.05)
        canary = Canary("v1", "v2", (0.5, 1.0), min_requests_per_step=10_000, store=store)
        client = redis.Redis.from_url(redis_server.url, decode_responses=True)
        key = f"t:foreign:counts:{canary.snapshot()['epoch']}"
        try:
            client.delete("t:foreign")
            client.hset("t:foreign", "a", "b")
            _serve(canary, 10)
            _until(lambda: "does not hold a string" in str(canary.status()), "the foreign value seen", 5)
            time.sleep(0.3)  # several syncs
            assert client.hget(key, "v2:n") == "10"
            assert canary.store_ok is False
            assert (canary.state, canary.weight) == (CanaryState.RUNNING, 0.5)
        finally:
            canary.close()
            client.close()

    @pytest.mark.parametrize("spoiled", ["abc", "007"])
    def test_a_count_that_is_not_a_number_is_not_added_again_and_again(
        self, redis_server: RedisServer, spoiled: str
    ) -> None:
        """A field of the counts hash that another client set to "abc" failed the adding script halfway: the
        counts before it were added, and added again on every poll (5 requests became hundreds). Now the
        script checks every field first and adds nothing; the canary holds. "007" passed that check (all
        digits) and still failed HINCRBY, which takes no leading zero: it is refused as well."""
        store = RedisStore(redis_server.url, "t:notcount", poll_s=0.05)
        canary = Canary("v1", "v2", (0.5, 1.0), min_requests_per_step=10_000, store=store)
        client = redis.Redis.from_url(redis_server.url, decode_responses=True)
        key = f"t:notcount:counts:{canary.snapshot()['epoch']}"
        try:
            client.hset(key, "v2:n", spoiled)
            for arm in ("v1", "v2"):
                for _ in range(5):
                    canary.feedback(Feedback("served", arm, time.monotonic(), latency_s=0.001))
            _until(lambda: not canary.store_ok, "the spoiled count seen", 5)
            time.sleep(0.3)  # several syncs
            assert int(client.hget(key, "v1:n") or 0) <= 5
            assert "not a count" in str(canary.status()["store"])
            assert (canary.state, canary.weight) == (CanaryState.RUNNING, 0.5)
        finally:
            canary.close()
            client.close()

    def test_bytes_that_are_not_utf8_are_a_foreign_state_not_an_outage(self, redis_server: RedisServer) -> None:
        """A value that is not UTF-8 raised from the client's decoder: the canary called Redis unreachable.
        Now it is a state that cannot be taken, and says so."""
        store = RedisStore(redis_server.url, "t:bytes", poll_s=0.05)
        canary = Canary("v1", "v2", (0.5, 1.0), min_requests_per_step=10_000, store=store)
        client = redis.Redis.from_url(redis_server.url)
        try:
            client.set("t:bytes", b"\xff\xfe{")
            _until(lambda: not canary.store_ok, "the foreign value seen", 5)
            assert "holds no canary state" in str(canary.status()["store"]["error"])
            assert (canary.state, canary.weight) == (CanaryState.RUNNING, 0.5)
            assert canary.route(0.4, {}).arm == "v2"
        finally:
            canary.close()
            client.close()

    def test_a_huge_value_is_refused_unread(self, redis_server: RedisServer) -> None:
        """A value of megabytes under the key was read (and decoded) on every poll, by every process: a
        200 MiB one took most of a core and its memory. Now its size is checked in Redis and it is not read."""
        client = redis.Redis.from_url(redis_server.url)
        client.set("t:huge", b" " * (4 * 2**20))
        store = RedisStore(redis_server.url, "t:other", poll_s=0.05)
        canary = Canary("v1", "v2", (0.5, 1.0), min_requests_per_step=10_000, store=store)
        refused = RedisStore(redis_server.url, "t:huge")
        try:
            with pytest.raises(ValueError, match="more than any canary state"):
                Canary("v1", "v2", (0.5, 1.0), store=refused)
            client.rename("t:huge", "t:other")
            _until(lambda: not canary.store_ok, "the huge value seen", 5)
            assert "more than any canary state" in str(canary.status()["store"]["error"])
            assert (canary.state, canary.weight) == (CanaryState.RUNNING, 0.5)
        finally:
            canary.close()
            refused.close()
            client.close()

    def test_a_hash_under_the_key_at_start_is_no_outage(self, redis_server: RedisServer) -> None:
        """A canary built on a key holding a hash raised StoreUnavailable ("cannot reach Redis") although
        Redis answered; now it is the ValueError of a saved state to fix or remove."""
        client = redis.Redis.from_url(redis_server.url)
        store = RedisStore(redis_server.url, "t:hash")
        try:
            client.hset("t:hash", "a", "b")
            with pytest.raises(ValueError, match="holds a hash"):
                Canary("v1", "v2", (0.5, 1.0), store=store)
        finally:
            store.close()
            client.close()

    def test_never_promoted_twice(self, redis_server: RedisServer) -> None:
        """Two canaries racing through every step from many threads promote exactly once."""
        canaries = [
            Canary("v1", "v2", (0.5, 1.0), min_requests_per_step=50, store=RedisStore(redis_server.url, "t:race"))
            for _ in range(2)
        ]
        try:

            def drive(c: Canary) -> None:
                for _ in range(400):
                    c.feedback(Feedback("served", "v2", time.monotonic(), latency_s=0.001))

            threads = [threading.Thread(target=drive, args=(c,)) for c in canaries for _ in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(WAIT)
            _until(lambda: all(c.state is CanaryState.PROMOTED for c in canaries), "both promoted", 5)
            saved = json.loads(redis.Redis.from_url(redis_server.url).get("t:race") or "{}")
            assert saved["decisions"] == {"step": 1, "promote": 1}
        finally:
            for c in canaries:
                c.close()


def _serve(canary: Canary, count: int) -> None:
    """``count`` requests the candidate served, as the router tells its canary."""
    for _ in range(count):
        canary.feedback(Feedback("served", "v2", time.monotonic(), latency_s=0.001))


def _failing(path: Path) -> Path:
    """A model of the same signature that fails on any non-zero input (its warm-up on zeros passes).

    ``y = reshape(x, [-1, 4 + (max(x) > 0)])``: five columns of four values cannot be.
    """
    i64 = TensorProto.INT64
    nodes = [
        helper.make_node("ReduceMax", ["x"], ["top"], keepdims=0),
        helper.make_node("Greater", ["top", "zero"], ["nonzero"]),
        helper.make_node("Cast", ["nonzero"], ["extra"], to=i64),
        helper.make_node("Unsqueeze", ["extra", "axis0"], ["extra1"]),
        helper.make_node("Add", ["extra1", "four"], ["width"]),
        helper.make_node("Concat", ["any", "width"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["y"]),
    ]
    inits = [
        onnx.numpy_helper.from_array(np.array(0, dtype=np.float32), "zero"),
        onnx.numpy_helper.from_array(np.array([0], dtype=np.int64), "axis0"),
        onnx.numpy_helper.from_array(np.array([4], dtype=np.int64), "four"),
        onnx.numpy_helper.from_array(np.array([-1], dtype=np.int64), "any"),
    ]
    graph = helper.make_graph(
        nodes,
        "broken",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), path)
    return path


def _config(tmp_path: Path, url: str) -> Path:
    _model(tmp_path / "v1.onnx")
    _model(tmp_path / "v2.onnx", 3.0)
    _failing(tmp_path / "bad.onnx")
    config = tmp_path / "models.toml"
    bad = f'min_requests_per_step = 200, max_error_rate = 0.05, redis_url = "{url}"'
    good = f'min_requests_per_step = 30, redis_url = "{url}"'
    config.write_text(
        f"""
[server]
admin_token = "{TOKEN}"

[[models]]
name = "bad"
versions.1 = {{ path = "v1.onnx", eject_after = 1000 }}
versions.2 = {{ path = "bad.onnx", eject_after = 1000 }}
split = {{ policy = "canary", baseline = "1", candidate = "2", steps = [0.5, 1.0], {bad} }}

[[models]]
name = "good"
versions.1 = {{ path = "v1.onnx" }}
versions.2 = {{ path = "v2.onnx" }}
split = {{ policy = "canary", baseline = "1", candidate = "2", steps = [0.2, 0.5, 1.0], {good} }}
"""
    )
    return config


class Server:
    """An ``inferkit serve --config`` process and an HTTP client to it."""

    def __init__(self, config: Path) -> None:
        self.proc, self.port, _ = _start_cli("--config", str(config), "--grpc-listeners", "1")
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=WAIT)
        assert self.proc.stderr is not None
        self.log: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)  # the pipe must not fill up
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        self.log.extend(self.proc.stderr)

    def infer(self, model: str, n: int) -> list[int]:
        body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1.0, 2.0, 3.0, 4.0]}]}
        return [self.client.post(f"/v2/models/{model}/infer", json=body).status_code for _ in range(n)]

    def canary(self, model: str) -> dict[str, Any]:
        answer = self.client.get(f"/v2/admin/models/{model}/canary", headers=AUTH)
        assert answer.status_code == 200, answer.text
        return dict(answer.json())

    def metric(self, name: str, **labels: str) -> float:
        wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in self.client.get("/metrics").text.splitlines():
            if line.startswith(f"{name}{{{wanted}}} "):
                return float(line.split()[-1])
        pytest.fail(f"no {name}{{{wanted}}} in /metrics")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.proc.wait(WAIT)
        self._reader.join(WAIT)
        assert self.proc.stderr is not None
        self.proc.stderr.close()


@pytest.fixture(name="servers")
def _servers() -> Iterator[Callable[[Path], Server]]:
    started: list[Server] = []

    def start(config: Path) -> Server:
        started.append(Server(config))
        return started[-1]

    yield start
    for server in started:
        if server.proc.returncode is None:
            server.stop(signal.SIGKILL)


@needs_redis
class TestProcesses:
    """Two ``inferkit serve`` processes behind one (imagined) load balancer."""

    def test_rollback_once_restart_resumes_and_redis_outage(
        self, tmp_path: Path, redis_server: RedisServer, servers: Callable[[Path], Server]
    ) -> None:
        """A failing candidate is rolled back once for both; a killed process resumes the same step;
        with Redis stopped both keep serving on their last weights and say so."""
        config = _config(tmp_path, redis_server.url)
        a, b = servers(config), servers(config)

        # Traffic to both: the broken candidate's failures pool, and one rollback holds for both.
        for _ in range(20):
            a.infer("bad", 10)
            b.infer("bad", 10)
            if a.canary("bad")["state"] == "rolled_back":
                break
        _until(lambda: a.canary("bad")["state"] == b.canary("bad")["state"] == "rolled_back", "rollback on both", 5)
        for server in (a, b):
            assert [d["action"] for d in server.canary("bad")["history"]] == ["rollback"]
            assert server.metric("inferkit_canary_decisions_total", kind="rollback", model="bad") == 1
            assert server.metric("inferkit_split_weight", arm="2", model="bad") == 0
            assert set(server.infer("bad", 20)) == {200}  # the baseline answers everything now

        # The good candidate steps once (traffic to both); a killed process comes back at that step.
        # Either process may take the step, and the other learns it from the store a poll later:
        # traffic stops as soon as either has, so that it cannot also carry the next step.
        for _ in range(200):
            if max(a.canary("good")["step"], b.canary("good")["step"]) >= 1:
                break
            a.infer("good", 1)
            b.infer("good", 1)
        _until(lambda: a.canary("good")["step"] == b.canary("good")["step"] == 1, "both at the step", 5)
        assert a.canary("good")["weight"] == 0.5
        a.stop(signal.SIGKILL)
        a = servers(config)
        status = a.canary("good")
        assert (status["state"], status["step"], status["weight"]) == ("running", 1, 0.5)
        assert [d["action"] for d in status["history"]] == ["step"]

        # Redis goes away: both keep serving at the last known weights, and say so.
        redis_server.stop()
        for server in (a, b):
            assert set(server.infer("good", 30)) == {200}
            _until(lambda s=server: s.metric("inferkit_canary_store_up", model="good") == 0, "store down in metrics")
            assert server.metric("inferkit_split_weight", arm="2", model="good") == 0.5
            refused = server.client.post("/v2/admin/models/good/canary/promote", headers=AUTH)
            assert refused.status_code == 503
        a.stop()
        b.stop()


class TestCli:
    """``inferkit canary status|promote|rollback|pause|resume --url URL MODEL``."""

    def test_status_and_control(self, tmp_path: Path, servers: Callable[[Path], Server]) -> None:
        """The subcommand prints the status as JSON and steers the canary; a wrong token exits 1."""
        _model(tmp_path / "v1.onnx")
        _model(tmp_path / "v2.onnx", 3.0)
        config = tmp_path / "models.toml"
        config.write_text(
            f'[server]\nadmin_token = "{TOKEN}"\n[[models]]\nname = "clf"\n'
            'versions.1 = { path = "v1.onnx" }\nversions.2 = { path = "v2.onnx" }\n'
            'split = { policy = "canary", baseline = "1", candidate = "2", steps = [0.1, 1.0], '
            'state_path = "clf.json" }\n'
        )
        server = servers(config)
        url = f"http://127.0.0.1:{server.port}"

        def cli(*args: str, token: str = TOKEN) -> subprocess.CompletedProcess[str]:
            env = {**os.environ, "INFERKIT_ADMIN_TOKEN": token}
            command = [sys.executable, "-m", "inferkit.cli", "canary", *args, "--url", url, "clf"]
            return subprocess.run(command, capture_output=True, text=True, env=env, timeout=WAIT, check=False)

        status = cli("status")
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["weight"] == 0.1
        assert json.loads(cli("pause").stdout)["state"] == "paused"
        assert json.loads(cli("resume").stdout)["state"] == "running"
        promoted = cli("promote")
        assert json.loads(promoted.stdout)["state"] == "promoted"
        assert json.loads((tmp_path / "clf.json").read_text())["state"] == "promoted"  # durable
        wrong = cli("rollback", token="x" * 32)
        assert (wrong.returncode, wrong.stdout) == (1, "")
        assert "403" in wrong.stderr
        assert server.canary("clf")["state"] == "promoted"
