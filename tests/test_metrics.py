"""Prometheus metrics: request outcomes pushed by the servers, predictor gauges read at scrape time."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import Future

import httpx
import numpy as np
import prometheus_client
import pytest
from fakes import BLOCK, Model, rows
from prometheus_client.parser import text_string_to_metric_families
from test_server_rest import Server, _json_body

from inferkit import PoolConfig, Predictor, Router, TensorSpec
from inferkit.server import Repository, ServedModel
from inferkit.server.metrics import BATCH_SIZE_BUCKETS, Metrics
from inferkit.server.rest import create_app

WAIT = 30  # seconds: a bound on every wait, never expected to be reached


def _double(**options: object) -> Predictor:
    spec = [TensorSpec("x", np.float64, (None, 3))]
    return Predictor.from_callable(lambda x: x * 2, inputs=spec, **options)  # type: ignore[arg-type]


@pytest.fixture(name="predictor")
def _predictor() -> Iterator[Predictor]:
    with _double(name="double") as predictor:
        yield predictor


def _samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body, _ = metrics.render()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def _labels(**labels: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(labels.items()))


class TestObserve:
    """What the REST and gRPC faces push."""

    def test_counts_by_model_arm_and_outcome(self, predictor: Predictor) -> None:
        """Each call adds one to its (model, arm, outcome) series; no arm is the empty label."""
        metrics = Metrics(Repository({"m": predictor}))
        metrics.observe("m", None, "success", 0.01)
        metrics.observe("m", None, "success", 0.02)
        metrics.observe("m", "b", "Overloaded", 0.0)
        samples = _samples(metrics)
        assert samples["inferkit_requests_total", _labels(model="m", arm="", outcome="success")] == 2
        assert samples["inferkit_requests_total", _labels(model="m", arm="b", outcome="Overloaded")] == 1

    def test_latency_histogram_holds_successes_only(self, predictor: Predictor) -> None:
        """Durations of successful requests go to the histogram; failures only to the counter."""
        metrics = Metrics(Repository({"m": predictor}))
        metrics.observe("m", "a", "success", 0.003)
        metrics.observe("m", "a", "ModelError", 5.0)
        samples = _samples(metrics)
        assert samples["inferkit_request_duration_seconds_count", _labels(model="m", arm="a")] == 1
        assert samples["inferkit_request_duration_seconds_sum", _labels(model="m", arm="a")] == pytest.approx(0.003)
        assert samples["inferkit_request_duration_seconds_bucket", _labels(model="m", arm="a", le="0.0025")] == 0
        assert samples["inferkit_request_duration_seconds_bucket", _labels(model="m", arm="a", le="0.005")] == 1

    def test_thread_safe(self, predictor: Predictor) -> None:
        """Eight threads observing at once lose no count."""
        metrics = Metrics(Repository({"m": predictor}))
        start = threading.Barrier(8)

        def work() -> None:
            start.wait(WAIT)
            for _ in range(1000):
                metrics.observe("m", None, "success", 0.001)

        threads = [threading.Thread(target=work) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
        assert _samples(metrics)["inferkit_requests_total", _labels(model="m", arm="", outcome="success")] == 8000


class TestRegistry:
    """Where the metrics are registered."""

    def test_a_fresh_registry_by_default(self, predictor: Predictor) -> None:
        """Never prometheus-client's global registry: two servers in one process do not collide."""
        repository = Repository({"m": predictor})
        one, two = Metrics(repository), Metrics(repository)
        assert one.registry is not prometheus_client.REGISTRY
        assert one.registry is not two.registry

    def test_a_callers_registry(self, predictor: Predictor) -> None:
        """Given a registry, the metrics sit beside the host's own; the same names twice are refused."""
        registry = prometheus_client.CollectorRegistry()
        host = prometheus_client.Counter("host_things", "The host's own metric.", registry=registry)
        host.inc()
        metrics = Metrics(Repository({"m": predictor}), registry)
        metrics.observe("m", None, "success", 0.1)
        text = metrics.render()[0].decode()
        assert "host_things_total 1.0" in text
        assert 'inferkit_requests_total{arm="",model="m",outcome="success"} 1.0' in text
        with pytest.raises(ValueError, match="Duplicated"):
            Metrics(Repository({"m": predictor}), registry)

    def test_render_gives_the_text_format(self, predictor: Predictor) -> None:
        """render() returns the exposition and Prometheus's content type; every name is inferkit_*."""
        metrics = Metrics(Repository({"m": predictor}))
        body, content_type = metrics.render()
        assert content_type.startswith("text/plain")
        names = {f.name for f in text_string_to_metric_families(body.decode())}
        assert names >= {"inferkit_queue_depth", "inferkit_replicas", "inferkit_batches", "inferkit_batch_size"}
        assert all(name.startswith("inferkit_") for name in names)


class TestPredictorGauges:
    """Queue depth, replicas and batch sizes read from Predictor.stats() at scrape time."""

    def test_queue_depth(self) -> None:
        """Requests waiting behind a busy replica show as queue depth, and drain to zero."""
        model = Model()
        with Predictor.from_callable(model, max_batch_size=1, name="gated") as predictor:
            metrics = Metrics(Repository({"g": predictor}))
            key = ("inferkit_queue_depth", _labels(model="g", predictor="gated"))
            blocker = predictor.submit(rows(BLOCK))
            assert model.entered.wait(WAIT)
            queued: list[Future[object]] = [predictor.submit(rows(float(i))) for i in range(2)]
            assert _samples(metrics)[key] == 2
            model.release.set()
            for future in (blocker, *queued):
                future.result(WAIT)
            assert _samples(metrics)[key] == 0

    def test_replicas_by_state(self) -> None:
        """Every state is reported, with zero where no replica is in it."""
        with _double(name="d", replicas=2) as predictor:
            samples = _samples(Metrics(Repository({"m": predictor})))
        states = {
            dict(labels)["state"]: value for (name, labels), value in samples.items() if name == "inferkit_replicas"
        }
        assert states == {"healthy": 2, "ejected": 0, "draining": 0, "dead": 0}

    def test_batch_sizes_histogram_and_batches_total(self, predictor: Predictor) -> None:
        """A 3-row and a 5-row batch: buckets are cumulative, _sum is the rows, _count the batches."""
        metrics = Metrics(Repository({"m": predictor}))
        predictor.predict(np.ones((3, 3)))
        predictor.predict(np.ones((5, 3)))
        samples = _samples(metrics)
        labels = {"model": "m", "predictor": "double"}

        def bucket(le: str) -> float:
            return samples["inferkit_batch_size_bucket", _labels(**labels, le=le)]

        assert [bucket(le) for le in ("1.0", "2.0", "4.0", "8.0", "+Inf")] == [0, 0, 1, 2, 2]
        assert bucket(f"{float(BATCH_SIZE_BUCKETS[-1])}") == 2
        assert samples["inferkit_batch_size_sum", _labels(**labels)] == 8
        assert samples["inferkit_batch_size_count", _labels(**labels)] == 2
        assert samples["inferkit_batches_total", _labels(**labels)] == 2

    def test_router_arms_and_versions(self) -> None:
        """Arms are labelled by arm name, versions by version label, each predictor once."""
        with _double(name="p1") as p1, _double(name="p2") as p2, _double(name="p3") as p3:
            inner = Router({"x": p2, "y": p3})
            repository = Repository([ServedModel("clf", Router({"a": p1, "b": inner}), {"1": p1, "3": p3})])
            samples = _samples(Metrics(repository))
        predictors = sorted(dict(labels)["predictor"] for name, labels in samples if name == "inferkit_queue_depth")
        assert predictors == ["a", "b/x", "b/y"]

    def test_a_failing_stats_call_skips_that_predictor(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A scrape never fails because one predictor's stats() raised."""
        with _double(name="ok") as ok, _double(name="bad") as bad:

            def broken() -> None:
                msg = "stats unavailable"
                raise RuntimeError(msg)

            monkeypatch.setattr(bad, "stats", broken)
            samples = _samples(Metrics(Repository({"ok": ok, "bad": bad})))
        models = {dict(labels)["model"] for name, labels in samples if name == "inferkit_queue_depth"}
        assert models == {"ok"}


class _Placed:
    """A backend that answers ``x * 2`` and reports a device it was placed on."""

    signature = None

    def __init__(self, device: str) -> None:
        self.device = device

    def run(self, inputs: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        return {name: x * 2 for name, x in inputs.items()}

    def close(self) -> None:
        pass


class TestReplicaInfo:
    """``inferkit_replica_info``: each replica's device and state, on a real server's /metrics."""

    def test_each_replica_shows_its_device_on_a_real_server(self) -> None:
        """Two replicas placed on two devices give one series each, value 1, naming the device and state;
        requests do not add series."""
        devices = iter(["cuda:0", "cuda:1"])
        with Predictor(lambda: _Placed(next(devices)), pool=PoolConfig(replicas=2), name="placed") as predictor:
            repository = Repository({"m": predictor})
            server = Server(create_app(repository))
            try:
                with httpx.Client(base_url=server.url, timeout=WAIT) as http:
                    for _ in range(5):
                        response = http.post("/v2/models/m/infer", content=_json_body({"x": np.ones((1, 3))}))
                        assert response.status_code == 200, response.text
                    body = http.get("/metrics").text
            finally:
                server.stop()
        info = [
            (s.labels, s.value)
            for family in text_string_to_metric_families(body)
            for s in family.samples
            if s.name == "inferkit_replica_info"
        ]
        assert sorted((labels["device"], labels["replica"], labels["state"], value) for labels, value in info) == [
            ("cuda:0", "placed-0", "healthy", 1.0),
            ("cuda:1", "placed-1", "healthy", 1.0),
        ]
        assert {(labels["model"], labels["predictor"]) for labels, _ in info} == {("m", "placed")}

    def test_a_replica_that_is_gone_leaves_no_series(self) -> None:
        """After scaling down to one replica, one series is left: the label set follows the pool's size."""
        with _double(name="d", replicas=2) as predictor:
            metrics = Metrics(Repository({"m": predictor}))
            assert len(_info(metrics)) == 2
            predictor.resize(1)
            end = time.monotonic() + WAIT
            while len(predictor.stats().replicas) > 1:
                assert time.monotonic() < end, "the second replica did not leave"
                time.sleep(0.01)
            (left,) = predictor.stats().replicas
            assert _info(metrics) == [(left.name, "cpu", "healthy", 1.0)]


def _info(metrics: Metrics) -> list[tuple[str, str, str, float]]:
    return sorted(
        (dict(labels)["replica"], dict(labels)["device"], dict(labels)["state"], value)
        for (name, labels), value in _samples(metrics).items()
        if name == "inferkit_replica_info"
    )
