"""The status page's JSON snapshot, the OpenAPI document and the ``--status-page`` setting, without a browser."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from importlib import resources
from typing import Any

import httpx
import numpy as np
import pytest
from starlette.routing import Route

from inferkit import Predictor, Router, TensorSpec
from inferkit.policies import Canary, CanaryDecision, Guard
from inferkit.server import Repository, ServedModel
from inferkit.server.rest import create_app
from inferkit.server.run import InferenceServer, loopback
from inferkit.server.status import REFRESH_S, SCHEMA_VERSION, StatusBoard

WAIT = 30  # seconds: a bound on every wait, never expected to be reached
SPEC = [TensorSpec("x", np.float32, (None, 4))]
OUT = [TensorSpec("y", np.float32, (None, 4))]


def _predictor(name: str, scale: float = 2.0, replicas: int = 1) -> Predictor:
    from inferkit.pool import PoolConfig

    return Predictor.from_callable(
        lambda x: x * scale, inputs=SPEC, outputs=OUT, name=name, pool=PoolConfig(replicas=replicas)
    )


def _canary_repository(decided: list[CanaryDecision]) -> Repository:
    canary = Canary(
        "1",
        "2",
        steps=(0.2, 0.5, 1.0),
        min_requests_per_step=5,
        guard=Guard(max_error_rate=0.5),
        on_decision=decided.append,
    )
    one, two = _predictor("clf-1"), _predictor("clf-2")
    return Repository(
        [
            ServedModel("m", _predictor("m", replicas=2)),
            ServedModel("clf", Router({"1": one, "2": two}, canary, seed=0, name="clf"), {"1": one, "2": two}),
        ]
    )


def _infer(client: httpx.Client, port: int, model: str, n: int) -> None:
    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    for _ in range(n):
        r = client.post(f"http://127.0.0.1:{port}/v2/models/{model}/infer", json=body)
        assert r.status_code == 200, r.text


@pytest.fixture(name="served")
def _served() -> Iterator[tuple[InferenceServer, list[CanaryDecision]]]:
    decided: list[CanaryDecision] = []
    server = InferenceServer(_canary_repository(decided), port=0, grpc_port=None, grace=WAIT).start()
    try:
        yield server, decided
    finally:
        server.join(WAIT)


def _keys(value: dict[str, Any], *names: str) -> None:
    missing = set(names) - value.keys()
    assert not missing, f"missing {sorted(missing)} in {sorted(value)}"


class TestSnapshot:
    """``GET /v2/status``: its schema, the canary's state and decisions, the rates."""

    def test_schema_models_replicas_and_a_canary_step(self, served: tuple[InferenceServer, list[Any]]) -> None:
        """Every model, its predictors and replicas; the split's weights, canary step and decisions."""
        server, decided = served
        with httpx.Client(timeout=WAIT) as c:
            _infer(c, server.port, "m", 10)
            sent = 0
            while not decided and sent < 500:  # until the first step ends (5 candidate requests at 20%)
                _infer(c, server.port, "clf", 1)
                sent += 1
            r = c.get(f"http://127.0.0.1:{server.port}/v2/status")
        assert r.status_code == 200
        assert r.headers["cache-control"] == "no-store"
        data = r.json()
        _keys(data, "schema", "time", "uptime_s", "refresh_s", "admin", "ready", "unloaded", "models", "splits")
        assert data["schema"] == SCHEMA_VERSION
        assert data["refresh_s"] == REFRESH_S
        assert data["admin"] is False  # no admin actions on the page
        assert data["ready"] is True
        models = {m["name"]: m for m in data["models"]}
        assert sorted(models) == ["clf", "m"]
        m = models["m"]
        _keys(m, "ready", "versions", "routed", "queue_depth", "completed", "failed", "rates", "predictors")
        _keys(m["rates"], "window_s", "requests_per_s", "errors_per_s", "history")
        assert m["completed"] == 10
        assert m["failed"] == 0
        (p,) = m["predictors"]
        _keys(p, "name", "state", "device", "queue_depth", "in_flight", "batch_sizes", "dispatch_reasons", "replicas")
        assert p["state"] == "ready"
        assert sum(p["batch_sizes"].values()) == p["batches"] > 0
        assert sum(p["dispatch_reasons"].values()) == p["batches"]
        assert len(p["replicas"]) == 2
        for replica in p["replicas"]:
            _keys(replica, "name", "state", "device", "p50_ms", "p99_ms", "batches", "ejections")
        assert sum(rep["requests"] for rep in p["replicas"]) == 10
        clf = models["clf"]
        assert clf["versions"] == ["1", "2"]
        assert clf["routed"] is True
        assert {q["name"] for q in clf["predictors"]} == {"clf-1", "clf-2"}
        assert clf["completed"] == sent

        (split,) = data["splits"]
        _keys(split, "model", "router", "policy", "arms", "weights", "routed", "shadow", "canary", "experiment")
        assert split["model"] == "clf"
        assert sum(split["routed"].values()) == sent
        canary = split["canary"]
        assert decided, "the canary never stepped"
        assert canary["step"] == 1
        assert canary["state"] == "running"
        assert canary["weight"] == 0.5
        assert canary["steps"] == [0.2, 0.5, 1.0]
        assert split["weights"] == {"1": 0.5, "2": 0.5}
        assert canary["guard"]["limits"]["max_error_rate"] == 0.5
        assert canary["guard"]["observed"]["max_error_rate"] == 0.0
        (decision,) = canary["decisions"]
        assert decision["action"] == "step"
        assert decision["reason"] == "guard passed"
        assert decision["numbers"]["candidate_requests"] >= 5
        assert {a["arm"] for a in split["experiment"]["arms"]} == {"1", "2"}
        assert isinstance(split["experiment"]["verdict"], str)

    def test_a_rollback_and_outcomes_show(self, served: tuple[InferenceServer, list[Any]]) -> None:
        """A manual rollback is a decision with its reason; recorded outcomes get means and intervals."""
        server, _ = served
        router = server.repository.model("clf").target
        assert isinstance(router, Router)
        with httpx.Client(timeout=WAIT) as c:
            for i in range(40):
                body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
                r = c.post(
                    f"http://127.0.0.1:{server.port}/v2/models/clf/infer", json=body, headers={"inferkit-key": str(i)}
                )
                assert r.status_code == 200
                router.record(float(i % 3 == 0), key=str(i))
            router.rollback()
            data = c.get(f"http://127.0.0.1:{server.port}/v2/status").json()
        canary = data["splits"][0]["canary"]
        assert canary["state"] == "rolled_back"
        assert canary["decisions"][-1]["action"] == "rollback"
        assert canary["decisions"][-1]["reason"] == "manual"
        assert data["splits"][0]["weights"] == {"1": 1.0, "2": 0.0}
        arms = data["splits"][0]["experiment"]["arms"]
        assert sum(a["outcomes"] for a in arms) == 40
        for arm in arms:
            if arm["outcomes"] >= 10:
                assert arm["ci_low"] <= arm["outcome_mean"] <= arm["ci_high"]

    def test_rates_from_samples(self) -> None:
        """Requests/s over the last minute from counters sampled at polls, one sample per second at most."""
        now = [1000.0]
        predictor = _predictor("m")
        try:
            board = StatusBoard(Repository({"m": predictor}), clock=lambda: now[0])
            assert board.snapshot()["models"][0]["rates"]["requests_per_s"] == 0.0
            x = np.ones((1, 4), np.float32)
            for _ in range(20):
                predictor.predict(x, timeout=WAIT)
            now[0] += 0.5
            assert board.snapshot()["models"][0]["rates"]["history"] == []  # under a second: no new sample
            now[0] += 1.5
            rates = board.snapshot()["models"][0]["rates"]
            assert rates["window_s"] == 2.0
            assert rates["requests_per_s"] == 10.0
            assert rates["errors_per_s"] == 0.0
            assert rates["history"] == [[0.0, 10.0, 0.0]]
            now[0] += 120.0  # the last minute has one sample: the rate spans the last two
            rates = board.snapshot()["models"][0]["rates"]
            assert rates["requests_per_s"] == 0.0
            assert len(rates["history"]) == 2
        finally:
            predictor.close(WAIT)

    def test_a_hook_keeps_the_callers_on_decision(self) -> None:
        """The board chains the canary's ``on_decision``: the operator's own hook still runs."""
        decided: list[CanaryDecision] = []
        repository = _canary_repository(decided)
        try:
            board = StatusBoard(repository)
            StatusBoard(repository)  # a second board on the same canary chains again, harmlessly
            router = repository.model("clf").target
            assert isinstance(router, Router)
            router.pause()
            assert [d.action for d in decided] == ["pause"]
            assert [d["action"] for d in board.snapshot()["splits"][0]["canary"]["decisions"]] == ["pause"]
        finally:
            repository.close(WAIT)


class _RoutedLoader:
    """Builds ``clf`` afresh at every load: a Router over two new predictors with a new Canary."""

    def __init__(self) -> None:
        self.loads = 0

    def __call__(self, name: str, config: Any) -> ServedModel:
        self.loads += 1
        one, two = _predictor(f"{name}-1"), _predictor(f"{name}-2")
        router = Router({"1": one, "2": two}, Canary("1", "2", min_requests_per_step=5), seed=0, name=name)
        return ServedModel(name, router, {"1": one, "2": two})


class TestHotSwaps:
    """Models loaded and unloaded while serving: the board keeps nothing of what left."""

    def test_swapped_canaries_and_unloaded_models_leave_nothing_behind(self) -> None:
        """25 hot swaps of a canaried model: each new canary's decisions show, and no entry outlives its canary."""
        from inferkit.server.control import RepositoryControl

        token = "an-operator-token-of-some-length"
        loader = _RoutedLoader()
        control = RepositoryControl(enabled=True, token=token, loader=loader)
        server = InferenceServer(_canary_repository([]), port=0, grpc_port=None, grace=WAIT, control=control).start()
        try:
            board = StatusBoard(server.repository)
            admin = f"http://127.0.0.1:{server.port}/v2/repository/models"
            with httpx.Client(timeout=WAIT, headers={"authorization": f"Bearer {token}"}) as c:
                _infer(c, server.port, "m", 3)
                assert [m["name"] for m in board.snapshot()["models"]] == ["clf", "m"]
                assert c.post(f"{admin}/m/unload").status_code == 200
                for _ in range(25):
                    assert c.post(f"{admin}/clf/load").status_code == 200
                    (split,) = board.snapshot()["splits"]
                    assert split["canary"]["decisions"] == []  # a fresh canary: none of its predecessors'
                    router = server.repository.model("clf").target
                    assert isinstance(router, Router)
                    router.pause()
                    (split,) = board.snapshot()["splits"]
                    assert [d["action"] for d in split["canary"]["decisions"]] == ["pause"]
                _infer(c, server.port, "clf", 3)
            assert loader.loads == 25
            data = board.snapshot()
            assert [m["name"] for m in data["models"]] == ["clf"]
            assert data["unloaded"] == ["m"]
            gc.collect()  # the swapped-out routers hold reference cycles
            assert len(board._decisions) == 1  # the live canary's only
            assert list(board._rates) == ["clf"]  # the unloaded model's samples went with it
        finally:
            server.join(WAIT)

    def test_an_unloaded_models_samples_go(self) -> None:
        """A model removed from the repository loses its rate samples at the next snapshot; a reload starts afresh."""
        now = [1000.0]
        first, second = _predictor("m"), _predictor("n")
        repository = Repository({"m": first, "n": second})
        try:
            board = StatusBoard(repository, clock=lambda: now[0])
            board.snapshot()
            first.predict(np.ones((1, 4), np.float32), timeout=WAIT)
            now[0] += 2.0
            board.snapshot()
            assert sorted(board._rates) == ["m", "n"]
            repository.remove("m").target.close(WAIT)
            now[0] += 2.0
            assert [m["name"] for m in board.snapshot()["models"]] == ["n"]
            assert list(board._rates) == ["n"]
            repository.install(ServedModel("m", _predictor("m")))
            now[0] += 2.0
            (m,) = (m for m in board.snapshot()["models"] if m["name"] == "m")
            assert m["rates"]["history"] == []  # one sample: no rate from the old model's counters
        finally:
            repository.close(WAIT)


class TestOpenApi:
    """``GET /v2/openapi.json`` documents the routes actually served; ``/docs`` renders it with the page."""

    @pytest.mark.parametrize("page", [True, False])
    def test_the_document_lists_exactly_the_served_routes(self, page: bool) -> None:
        predictor = _predictor("m")
        repository = Repository({"m": predictor})
        app = create_app(repository, status_page=page)
        expected = {
            (method.lower(), r.path)
            for r in app.routes
            if isinstance(r, Route)
            for method in r.methods or ()
            if method != "HEAD"
        }
        server = InferenceServer(repository, port=0, grpc_port=None, grace=WAIT, status_page=page).start()
        try:
            with httpx.Client(timeout=WAIT, base_url=f"http://127.0.0.1:{server.port}") as c:
                doc = c.get("/v2/openapi.json").json()
                documented = {(method, path) for path, ops in doc["paths"].items() for method in ops}
                assert documented == expected
                assert doc["openapi"].startswith("3.")
                infer = doc["paths"]["/v2/models/{model}/versions/{version}/infer"]["post"]
                assert [p["name"] for p in infer["parameters"]] == ["model", "version"]
                assert "requestBody" in infer
                assert ("get", "/v2/status") in documented if page else ("get", "/v2/status") not in documented
                for method, path in documented:  # each one is answered (not 404) where it takes no parameter
                    if method == "get" and "{" not in path:
                        assert c.get(path).status_code in {200, 503}, path
                docs = c.get("/docs")
                assert docs.status_code == (200 if page else 404)
                if page:
                    assert "/v2/models/{model}/infer" in docs.text
                    assert c.get("/").headers["content-type"].startswith("text/html")
                else:
                    assert c.get("/").status_code == 404
                    assert c.get("/v2/status").status_code == 404
        finally:
            server.join(WAIT)


class TestSetting:
    """On by default on a loopback address only; ``--status-page`` / ``--no-status-page`` decide otherwise."""

    @pytest.mark.parametrize(
        ("host", "on"),
        [
            ("127.0.0.1", True),
            ("::1", True),
            ("localhost", True),
            ("0.0.0.0", False),
            ("10.1.2.3", False),
            ("example.org", False),
        ],
    )
    def test_loopback(self, host: str, on: bool) -> None:
        assert loopback(host) is on

    def test_the_default_follows_the_host_and_an_explicit_setting_wins(self) -> None:
        predictor = _predictor("m")
        try:
            repository = Repository({"m": predictor})
            assert InferenceServer(repository, host="127.0.0.1").status_page is True
            assert InferenceServer(repository, host="0.0.0.0").status_page is False
            assert InferenceServer(repository, host="0.0.0.0", status_page=True).status_page is True
            assert InferenceServer(repository, host="127.0.0.1", status_page=False).status_page is False
        finally:
            predictor.close(WAIT)

    def test_the_assets_ship_in_the_package(self) -> None:
        files = resources.files("inferkit.server.status")
        page = files.joinpath("index.html").read_text()
        assert '<script src="/status.js">' in page
        assert "http" not in page.replace("http://www.w3.org", "")  # nothing fetched from elsewhere
        script = files.joinpath("status.js").read_text()
        assert 'fetch("/v2/status"' in script
        assert "innerHTML" not in script  # names from the server never become markup


@pytest.mark.parametrize(("flag", "status"), [((), 200), (("--no-status-page",), 404), (("--status-page",), 200)])
def test_the_cli_setting(tmp_path: Any, flag: tuple[str, ...], status: int) -> None:
    """``inferkit serve`` on 127.0.0.1 serves the page unless ``--no-status-page``."""
    import signal

    from test_server_run import _model, _start_cli

    proc, port, _ = _start_cli(str(_model(tmp_path / "a.onnx")), *flag)
    try:
        with httpx.Client(timeout=WAIT) as c:
            assert c.get(f"http://127.0.0.1:{port}/").status_code == status
            assert c.get(f"http://127.0.0.1:{port}/v2/openapi.json").status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(WAIT)
        assert proc.stderr is not None
        proc.stderr.close()


class TestPollingCost:
    def test_many_pollers_share_one_snapshot(
        self, served: tuple[InferenceServer, list[Any]], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """40 clients polling /v2/status at once cost one snapshot, not forty (the work is bounded per second)."""
        import threading

        server, _ = served
        computed = []
        real = StatusBoard.snapshot

        def counted(self: StatusBoard) -> dict[str, Any]:
            computed.append(1)
            return real(self)

        monkeypatch.setattr(StatusBoard, "snapshot", counted)
        bodies: list[bytes] = []
        start = threading.Barrier(40, timeout=WAIT)

        def poll() -> None:
            with httpx.Client(timeout=WAIT) as c:
                start.wait()
                response = c.get(f"http://127.0.0.1:{server.port}/v2/status")
                assert response.status_code == 200
                bodies.append(response.content)

        threads = [threading.Thread(target=poll) for _ in range(40)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
        assert len(bodies) == 40
        assert len(computed) <= 2  # one, or two if the polls straddle the freshness window
        assert len(set(bodies)) == len(computed)
