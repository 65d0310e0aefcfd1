"""Canaries steerable and durable: state in a file, REST admin endpoints, metrics and the split in stats."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_server_run import _model, _start_cli

from inferkit import CanaryFinished, ModelError, Overloaded, Predictor, Router, TensorSpec
from inferkit.policies import Canary, CanaryState, Feedback, FileStore, Guard
from inferkit.server import Repository, ServedModel
from inferkit.server.config import ConfigError, load
from inferkit.server.control import RepositoryControl
from inferkit.server.run import InferenceServer

WAIT = 30  # seconds: a bound on every wait, never expected to be reached
TOKEN = "an-operator-token-of-some-length"
AUTH = {"authorization": f"Bearer {TOKEN}"}


def _served(canary: Canary, arm: str, n: int, *, failed: bool = False) -> None:
    for _ in range(n):
        canary.feedback(Feedback("served", arm, 1.0, latency_s=0.001, failed=failed))


def _scaled(factor: float, name: str) -> Predictor:
    return Predictor.from_callable(
        lambda x: x * np.float32(factor),
        inputs=[TensorSpec("x", np.float32, (None, 4))],
        outputs=[TensorSpec("y", np.float32, (None, 4))],
        name=name,
    )


class TestFileStore:
    """A canary's step, weight and decision history survive a restart through a state file."""

    def test_a_restarted_canary_resumes_the_same_step(self, tmp_path: Path) -> None:
        """A new Canary on the same file starts at the step, weight and history the old one reached."""
        path = tmp_path / "state" / "canary.json"
        first = Canary("v1", "v2", (0.1, 0.5, 1.0), min_requests_per_step=5, store=FileStore(path))
        _served(first, "v2", 5)
        assert (first.step, first.weight) == (1, 0.5)
        first.pause()
        second = Canary("v1", "v2", (0.1, 0.5, 1.0), min_requests_per_step=5, store=FileStore(path))
        assert (second.state, second.step, second.weight) == (CanaryState.PAUSED, 1, 0.5)
        assert [d["action"] for d in second.status()["history"]] == ["step", "pause"]
        assert second.status()["decisions"] == {"step": 1, "pause": 1}
        assert sorted(p.name for p in path.parent.iterdir()) == ["canary.json"]  # no temporary file left
        assert json.loads(path.read_text())["revision"] == second.snapshot()["revision"]

    def test_a_different_rollout_starts_over(self, tmp_path: Path) -> None:
        """A saved state of another candidate is not taken: the new rollout starts at step 0 and replaces it."""
        path = tmp_path / "canary.json"
        old = Canary("v1", "v2", (0.1, 1.0), min_requests_per_step=2, store=FileStore(path))
        _served(old, "v2", 2)
        assert old.step == 1
        new = Canary("v1", "v3", (0.1, 1.0), min_requests_per_step=2, store=FileStore(path))
        assert (new.step, new.weight, new.status()["history"]) == (0, 0.1, [])
        assert json.loads(path.read_text())["candidate"] == "v3"

    def test_a_rollback_is_durable(self, tmp_path: Path) -> None:
        """A guard's rollback is saved: the restarted canary keeps all traffic on the baseline."""
        path = tmp_path / "canary.json"
        guard = Guard(max_error_rate=0.1)
        first = Canary("v1", "v2", (0.5, 1.0), min_requests_per_step=10, guard=guard, store=FileStore(path))
        _served(first, "v2", 3, failed=True)
        assert first.state is CanaryState.ROLLED_BACK
        again = Canary("v1", "v2", (0.5, 1.0), min_requests_per_step=10, guard=guard, store=FileStore(path))
        assert (again.state, again.weight) == (CanaryState.ROLLED_BACK, 0.0)
        assert again.route(0.0, {}).arm == "v1"


@pytest.fixture(name="server")
def _server() -> Iterator[Callable[..., tuple[InferenceServer, Canary]]]:
    started: list[InferenceServer] = []

    def start(token: str | None = TOKEN, store: FileStore | None = None) -> tuple[InferenceServer, Canary]:
        canary = Canary("1", "2", (0.25, 1.0), min_requests_per_step=1000, store=store)
        versions = {"1": _scaled(1, "clf-1"), "2": _scaled(2, "clf-2")}
        router = Router(versions, canary, name="clf")
        repository = Repository([ServedModel("clf", router, versions), ServedModel("plain", _scaled(3, "plain"))])
        control = RepositoryControl(token=token)
        server = InferenceServer(repository, port=0, grpc_port=None, grace=WAIT, control=control).start()
        started.append(server)
        return server, canary

    yield start
    for server in started:
        server.join(WAIT)


class TestConfirmation:
    """A candidate's model error counts only once the baseline served the same input."""

    def test_a_busy_baseline_does_not_turn_bad_input_into_a_rollback(self) -> None:
        """Inputs that fail on both versions, sent while the baseline refuses every check, leave the canary alone."""
        gate, entered = threading.Event(), threading.Event()

        def model(x: np.ndarray) -> np.ndarray:
            if (x < 0).any():
                raise ValueError("negative input")  # the request's own error, on both versions
            entered.set()
            gate.wait(WAIT)
            return x * 2

        base = Predictor.from_callable(model, max_batch_size=1, max_queue_size=2, name="base")
        cand = Predictor.from_callable(model, name="cand")
        canary = Canary("base", "cand", (1.0,), min_requests_per_step=100, guard=Guard(max_error_rate=0.01))
        with Router({"base": base, "cand": cand}, canary) as router:
            held = [base.submit(np.ones((1, 1)))]  # the baseline's one worker waits at the gate
            try:
                assert entered.wait(WAIT)
                with contextlib.suppress(Overloaded):
                    for _ in range(10):
                        held.append(base.submit(np.ones((1, 1))))
                for _ in range(10):
                    with pytest.raises(ModelError):
                        router.predict(-np.ones((1, 1)))
                assert (canary.state, canary.weight) == (CanaryState.RUNNING, 1.0)
            finally:
                gate.set()
            assert [f.result(WAIT).tolist() for f in held] == [[[2.0]]] * len(held)

    def test_an_input_that_times_out_on_both_versions_is_the_inputs(self) -> None:
        """An ExecutionTimeout was never checked against the baseline: inputs slow on both versions
        rolled a healthy candidate back (the baseline's own error rate higher than the candidate's)."""
        gate = threading.Event()

        def model(x: np.ndarray) -> np.ndarray:
            if (x < 0).any():
                gate.wait(WAIT)  # slow on every version: past execution_timeout
            return x * 2

        def version(name: str) -> Predictor:
            return Predictor.from_callable(model, execution_timeout=0.2, name=name)

        base, cand = version("base"), version("cand")
        canary = Canary("base", "cand", (1.0,), min_requests_per_step=100, guard=Guard(max_error_rate=0.01))
        try:
            with Router({"base": base, "cand": cand}, canary) as router:
                for _ in range(5):
                    with pytest.raises(ModelError, match="ran past"):
                        router.predict(-np.ones((1, 1)))
                deadline = time.monotonic() + WAIT
                while sum(base.stats().failed.values()) < 5 and time.monotonic() < deadline:
                    time.sleep(0.01)  # the baseline's checks, running beside the callers
                assert base.stats().failed == {"ExecutionTimeout": 5}
                assert (canary.state, canary.weight) == (CanaryState.RUNNING, 1.0)
        finally:
            gate.set()


class TestAdmin:
    """REST admin endpoints: status, promote, rollback, pause, resume behind the operator's token."""

    def test_control_with_the_token(self, server: Callable[..., tuple[InferenceServer, Canary]]) -> None:
        """Each action changes the canary and answers its new status; status shows history and store."""
        srv, canary = server()
        base = f"http://127.0.0.1:{srv.port}/v2/admin/models/clf/canary"
        with httpx.Client(timeout=WAIT, headers=AUTH) as client:
            status = client.get(base).json()
            assert (status["model"], status["state"], status["weight"], status["store"]) == (
                "clf",
                "running",
                0.25,
                None,
            )
            assert client.post(base + "/pause").json()["state"] == "paused"
            assert canary.state is CanaryState.PAUSED
            assert client.post(base + "/resume").json()["state"] == "running"
            promoted = client.post(base + "/promote").json()
            assert (promoted["state"], promoted["weight"]) == ("promoted", 1.0)
            assert [d["action"] for d in promoted["history"]] == ["pause", "resume", "promote"]
            assert client.post(base + "/rollback").json()["weight"] == 0.0
            assert canary.route(0.0, {}).arm == "1"
            assert client.post(base + "/explode").status_code == 404
            assert client.get(f"http://127.0.0.1:{srv.port}/v2/admin/models/plain/canary").status_code == 409
            assert client.get(f"http://127.0.0.1:{srv.port}/v2/admin/models/nope/canary").status_code == 404

    def test_a_finished_canary_cannot_be_paused_or_resumed(
        self, server: Callable[..., tuple[InferenceServer, Canary]]
    ) -> None:
        """Resume after promote restarted the rollout (half the traffic back on the baseline, the guard armed
        again); resume after rollback left it "running" at weight 0 for good. Now 409, nothing changes; a
        finished canary can still be promoted or rolled back by hand."""
        srv, canary = server()
        base = f"http://127.0.0.1:{srv.port}/v2/admin/models/clf/canary"
        with httpx.Client(timeout=WAIT, headers=AUTH) as client:
            for finish, state, weight in (("promote", "promoted", 1.0), ("rollback", "rolled_back", 0.0)):
                assert client.post(f"{base}/{finish}").json()["state"] == state
                for action in ("resume", "pause"):
                    reply = client.post(f"{base}/{action}")
                    assert (reply.status_code, f"is {state}: {action} applies to a rollout" in reply.text) == (
                        409,
                        True,
                    ), reply.text
                    assert (canary.state.value, canary.weight) == (state, weight)
        with pytest.raises(CanaryFinished):
            canary.resume()

    def test_401_and_403(self, server: Callable[..., tuple[InferenceServer, Canary]]) -> None:
        """No token is 401, a wrong one 403; neither changes anything."""
        srv, canary = server()
        base = f"http://127.0.0.1:{srv.port}/v2/admin/models/clf/canary"
        with httpx.Client(timeout=WAIT) as client:
            missing = client.post(base + "/promote")
            assert missing.status_code == 401
            assert missing.headers["www-authenticate"] == "Bearer"
            assert client.get(base).status_code == 401
            wrong = {"authorization": "Bearer " + "x" * len(TOKEN)}
            assert client.post(base + "/promote", headers=wrong).status_code == 403
            assert client.post(base + "/promote", headers={"authorization": f"Basic {TOKEN}"}).status_code == 403
        assert canary.state is CanaryState.RUNNING

    def test_off_without_a_token(self, server: Callable[..., tuple[InferenceServer, Canary]]) -> None:
        """Without a configured token every admin call is 403, whatever is sent."""
        srv, canary = server(token=None)
        base = f"http://127.0.0.1:{srv.port}/v2/admin/models/clf/canary"
        with httpx.Client(timeout=WAIT, headers=AUTH) as client:
            refused = client.post(base + "/rollback")
            assert refused.status_code == 403
            assert "canary control is off" in refused.json()["error"]
        assert canary.state is CanaryState.RUNNING


class TestMetricsAndStats:
    """The split and the canary's state in /metrics and /v2/models/{m}/stats."""

    def test_split_weight_state_step_and_decisions(
        self, server: Callable[..., tuple[InferenceServer, Canary]], tmp_path: Path
    ) -> None:
        """Weights per arm, a 1 for the state, the step, decisions by kind, the store's health."""
        srv, canary = server(store=FileStore(tmp_path / "c.json"))
        url = f"http://127.0.0.1:{srv.port}"
        canary.pause()
        canary.resume()
        canary.pause()
        with httpx.Client(timeout=WAIT) as client:
            samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
            for family in text_string_to_metric_families(client.get(url + "/metrics").text):
                for s in family.samples:
                    samples[s.name, tuple(sorted(s.labels.items()))] = s.value
            assert samples["inferkit_split_weight", (("arm", "1"), ("model", "clf"))] == 0.75
            assert samples["inferkit_split_weight", (("arm", "2"), ("model", "clf"))] == 0.25
            assert samples["inferkit_canary_state", (("model", "clf"), ("state", "paused"))] == 1
            assert samples["inferkit_canary_state", (("model", "clf"), ("state", "running"))] == 0
            assert samples["inferkit_canary_step", (("model", "clf"),)] == 0
            assert samples["inferkit_canary_decisions_total", (("kind", "pause"), ("model", "clf"))] == 2
            assert samples["inferkit_canary_decisions_total", (("kind", "rollback"), ("model", "clf"))] == 0
            assert samples["inferkit_canary_store_up", (("model", "clf"),)] == 1
            assert not any(name == "inferkit_split_weight" and ("model", "plain") in labels for name, labels in samples)
            stats = client.get(url + "/v2/models/clf/stats").json()["model_stats"]
            entry: dict[str, Any] = next(e for e in stats if e["version"] == "")
            assert entry["split"] == {"1": 0.75, "2": 0.25}
            assert entry["canary"] == {"state": "paused", "step": 0, "weight": 0.25}
            assert all("split" not in e for e in stats if e["version"])


class TestConfig:
    """Per-model autoscaling and canary state in the TOML, autoscaling and the admin token on the CLI."""

    def test_autoscale_per_model(self, tmp_path: Path) -> None:
        """``autoscale`` brings a model's pool within its bounds at once; the other model keeps its size."""
        _model(tmp_path / "a.onnx")
        (tmp_path / "m.toml").write_text(
            '[[models]]\nname = "scaled"\npath = "a.onnx"\nautoscale = { min_replicas = 2, max_replicas = 3 }\n'
            '[[models]]\nname = "fixed"\npath = "a.onnx"\n'
        )
        config = load(tmp_path / "m.toml")
        try:
            scaled, fixed = config.repository.resolve("scaled"), config.repository.resolve("fixed")
            assert isinstance(scaled, Predictor)
            assert isinstance(fixed, Predictor)
            assert len(scaled.stats().replicas) == 2
            assert len(fixed.stats().replicas) == 1
        finally:
            config.repository.close()

    @pytest.mark.parametrize(
        ("extra", "message"),
        [
            ('autoscale = { max_replicas = 0 }\npath = "a.onnx"', r"models\[0\].autoscale: max_replicas must be"),
            ('autoscale = { spare = 1 }\npath = "a.onnx"', r"models\[0\].autoscale: .*spare"),
        ],
    )
    def test_autoscale_errors_name_the_field(self, tmp_path: Path, extra: str, message: str) -> None:
        """A bad autoscale table is a ConfigError about models[0].autoscale."""
        _model(tmp_path / "a.onnx")
        (tmp_path / "m.toml").write_text(f'[[models]]\nname = "m"\n{extra}\n')
        with pytest.raises(ConfigError, match=message):
            load(tmp_path / "m.toml")

    def test_canary_state_path_and_errors(self, tmp_path: Path) -> None:
        """``state_path`` is relative to the file; state_path with redis_url, or a short admin token, is refused."""
        _model(tmp_path / "a.onnx")
        versions = 'versions.1 = { path = "a.onnx" }\nversions.2 = { path = "a.onnx" }\n'
        split = 'split = { policy = "canary", baseline = "1", candidate = "2", steps = [0.5, 1.0], '
        (tmp_path / "m.toml").write_text(f'[[models]]\nname = "m"\n{versions}{split}state_path = "s/m.json" }}\n')
        config = load(tmp_path / "m.toml")
        try:
            assert json.loads((tmp_path / "s" / "m.json").read_text())["weight"] == 0.5
        finally:
            config.repository.close()
        both = 'state_path = "m.json", redis_url = "redis://127.0.0.1:1" }\n'
        (tmp_path / "m.toml").write_text(f'[[models]]\nname = "m"\n{versions}{split}{both}')
        with pytest.raises(ConfigError, match=r"models\[0\].split: give state_path or redis_url, not both"):
            load(tmp_path / "m.toml")
        (tmp_path / "m.toml").write_text('[server]\nadmin_token = "short"\n[[models]]\nname = "m"\npath = "a.onnx"\n')
        with pytest.raises(ConfigError, match=r"server.admin_token .* at least 16 characters"):
            load(tmp_path / "m.toml")

    def test_unreachable_redis_refuses_to_start(self, tmp_path: Path) -> None:
        """A new process cannot start a shared canary it cannot read (it has no last known weights)."""
        _model(tmp_path / "a.onnx")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]  # nothing listens once closed
        (tmp_path / "m.toml").write_text(
            '[[models]]\nname = "m"\nversions.1 = { path = "a.onnx" }\nversions.2 = { path = "a.onnx" }\n'
            'split = { policy = "canary", baseline = "1", candidate = "2", '
            f'redis_url = "redis://127.0.0.1:{port}/0" }}\n'
        )
        with pytest.raises(ConfigError, match=r"models\[0\].split: the canary's state cannot be read"):
            load(tmp_path / "m.toml")

    @pytest.mark.parametrize("source", ["model", "config"])
    def test_the_admin_token_file_guards_repository_control(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str
    ) -> None:
        """``--repository-control --admin-token-file`` (or a config's ``repository_control = true``) without
        INFERKIT_ADMIN_TOKEN refused to start, "needs a token": the file was read after the control was built."""
        monkeypatch.delenv("INFERKIT_ADMIN_TOKEN", raising=False)
        (tmp_path / "token").write_text(TOKEN + "\n")
        model = _model(tmp_path / "a.onnx")
        (tmp_path / "m.toml").write_text(
            '[server]\nrepository_control = true\n[[models]]\nname = "a"\nversions.1 = { path = "a.onnx" }\n'
        )
        args = (str(model), "--repository-control") if source == "model" else ("--config", str(tmp_path / "m.toml"))
        proc, port, _ = _start_cli(*args, "--admin-token-file", str(tmp_path / "token"), "--grpc-listeners", "1")
        try:
            with httpx.Client(timeout=WAIT) as client:
                index = f"http://127.0.0.1:{port}/v2/repository/index"
                assert client.post(index, headers=AUTH).status_code == 200
                unload = f"http://127.0.0.1:{port}/v2/repository/models/a/unload"
                assert client.post(unload).status_code == 401
                assert client.post(unload, headers={"authorization": "Bearer " + "x" * 20}).status_code == 403
        finally:
            proc.terminate()
            proc.wait(WAIT)
            assert proc.stderr is not None
            proc.stderr.close()

    def test_cli_autoscaler_and_admin_token_file(self, tmp_path: Path) -> None:
        """``--max-replicas`` turns the autoscaler on (the pool grows to --min-replicas); the token file
        turns the admin endpoints on."""
        (tmp_path / "token").write_text(TOKEN + "\n")
        args = (str(_model(tmp_path / "a.onnx")), "--min-replicas", "2", "--max-replicas", "3")
        proc, port, _ = _start_cli(*args, "--admin-token-file", str(tmp_path / "token"), "--grpc-listeners", "1")
        try:
            with httpx.Client(timeout=WAIT) as client:
                groups = client.get(f"http://127.0.0.1:{port}/v2/models/a/config").json()["instance_group"]
                assert sum(g["count"] for g in groups) == 2
                no_canary = client.get(f"http://127.0.0.1:{port}/v2/admin/models/a/canary", headers=AUTH)
                assert no_canary.status_code == 409  # authorized: the token from the file is in force
        finally:
            proc.terminate()
            proc.wait(WAIT)
            assert proc.stderr is not None
            proc.stderr.close()
