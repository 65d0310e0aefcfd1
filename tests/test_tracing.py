"""Tests for inferkit.tracing: spans from events, in process and through a live server, into the SDK's memory."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np
import pytest

pytest.importorskip("opentelemetry.sdk")

import tritonclient.grpc as grpcclient
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from inferkit import (
    ABTest,
    DeadlineExceeded,
    ExecutionTimeout,
    InvalidInput,
    ModelError,
    Predictor,
    Router,
    TensorSpec,
    tracing,
)
from inferkit.server import Repository
from inferkit.server.run import InferenceServer
from tests.test_server_run import WAIT, _infer_json

SPEC = TensorSpec("x", np.float32, (None, 4))
TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
PARENT_ID = 0xB7AD6B7169203331
TRACEPARENT = f"00-{TRACE_ID:032x}-{PARENT_ID:016x}-01"


@contextlib.contextmanager
def traced(**options: Any) -> Iterator[Tracing]:
    """Tracing instrumented (``options`` to :func:`tracing.instrument`) into an in-memory exporter."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.instrument(provider, **options)
    try:
        yield Tracing(exporter, provider)
    finally:
        tracing.uninstrument()
        provider.shutdown()


@pytest.fixture(name="spans")
def _spans() -> Iterator[Tracing]:
    with traced() as spans:
        yield spans


class Tracing:
    def __init__(self, exporter: InMemorySpanExporter, provider: TracerProvider) -> None:
        self.exporter = exporter
        self.tracer = provider.get_tracer("test")

    def named(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.exporter.get_finished_spans() if s.name == name]

    def one(self, name: str) -> ReadableSpan:
        found = self.named(name)
        assert len(found) == 1, [s.name for s in self.exporter.get_finished_spans()]
        return found[0]


def _double(name: str = "m", fn: Callable[[np.ndarray], np.ndarray] | None = None, **options: Any) -> Predictor:
    return Predictor.from_callable(
        fn or (lambda x: x * 2), name=name, inputs=[SPEC], outputs=[TensorSpec("y", np.float32, (None, 4))], **options
    )


def _ctx(span: ReadableSpan) -> Any:
    assert span.context is not None
    return span.context


class TestInProcess:
    def test_predict_under_a_parent(self, spans: Tracing) -> None:
        """A request span is the caller's current span's child; queue under it; the batch links to it."""
        with _double() as predictor, spans.tracer.start_as_current_span("caller") as caller:
            predictor.predict(np.ones((3, 4), np.float32))
        request = spans.one("inferkit.request")
        assert request.parent is not None
        assert request.parent.span_id == caller.get_span_context().span_id
        assert _ctx(request).trace_id == caller.get_span_context().trace_id
        assert request.attributes is not None
        assert request.attributes["inferkit.model"] == "m"
        queue = spans.one("inferkit.queue")
        assert queue.parent is not None
        assert queue.parent.span_id == _ctx(request).span_id
        batch = spans.one("inferkit.batch")
        assert batch.parent is None  # its own trace, linked to each request
        assert [link.context.span_id for link in batch.links] == [_ctx(request).span_id]
        assert batch.attributes is not None
        assert batch.attributes["inferkit.batch_size"] == 1
        assert batch.attributes["inferkit.rows"] == 3
        call = spans.one("inferkit.model_call")
        assert call.parent is not None
        assert call.parent.span_id == _ctx(batch).span_id
        for span in (request, queue, batch, call):
            assert span.start_time is not None
            assert span.end_time is not None
            assert span.start_time <= span.end_time
        assert queue.start_time == request.start_time
        assert call.end_time == request.end_time
        assert request.status.status_code is StatusCode.UNSET

    def test_submitted_together_one_batch_links_each(self, spans: Tracing) -> None:
        """Requests queued behind a busy replica run as one batch whose span links to each request's span."""
        entered, gate = threading.Event(), threading.Event()

        def gated(x: np.ndarray) -> np.ndarray:
            entered.set()
            assert gate.wait(WAIT)
            return x * 2

        with _double(fn=gated, max_batch_size=16) as predictor:
            with spans.tracer.start_as_current_span("first"):
                first = predictor.submit(np.ones((1, 4), np.float32))
            assert entered.wait(WAIT)
            with spans.tracer.start_as_current_span("rest") as rest:
                queued = [predictor.submit(np.ones((2, 4), np.float32)) for _ in range(3)]
                late = predictor.submit(np.ones((1, 4), np.float32), timeout=0.05)
            with pytest.raises(DeadlineExceeded):
                late.result(WAIT)
            gate.set()
            for future in (first, *queued):
                future.result(WAIT)
        requests = [
            r
            for r in spans.named("inferkit.request")
            if r.parent and r.parent.span_id == rest.get_span_context().span_id
        ]
        assert len(requests) == 4
        expired = [r for r in requests if r.status.status_code is StatusCode.ERROR]
        assert len(expired) == 1
        assert "deadline" in (expired[0].status.description or "")
        served = {_ctx(r).span_id for r in requests} - {_ctx(expired[0]).span_id}
        batches = spans.named("inferkit.batch")
        assert len(batches) == 2
        last = max(batches, key=lambda b: b.start_time or 0)
        assert {link.context.span_id for link in last.links} == served
        assert last.attributes is not None
        assert last.attributes["inferkit.batch_size"] == 3
        assert last.attributes["inferkit.rows"] == 6
        assert len(spans.named("inferkit.queue")) == 5  # the expired one waited too

    def test_model_error_marks_the_request(self, spans: Tracing) -> None:
        """A request the model failed on ends in an ERROR span, and so does the model call."""

        def broken(x: np.ndarray) -> np.ndarray:
            msg = "no"
            raise ValueError(msg)

        with _double(fn=broken) as predictor, pytest.raises(ModelError):
            predictor.predict(np.ones((1, 4), np.float32))
        assert spans.one("inferkit.request").status.status_code is StatusCode.ERROR
        assert spans.one("inferkit.model_call").status.status_code is StatusCode.ERROR

    def test_router_arm_choice(self, spans: Tracing) -> None:
        """The router's choice is a span of its own, and the request it led to carries the arm."""
        router = Router({"v1": _double("a"), "v2": _double("b")}, ABTest({"v1": 0.0, "v2": 1.0}), name="r")
        with router, spans.tracer.start_as_current_span("caller") as caller:
            router.predict(np.ones((1, 4), np.float32))
        route = spans.one("inferkit.route")
        assert route.attributes is not None
        assert route.attributes["inferkit.arm"] == "v2"
        assert route.attributes["inferkit.router"] == "r"
        assert route.parent is not None
        assert route.parent.span_id == caller.get_span_context().span_id
        request = spans.one("inferkit.request")
        assert request.attributes is not None
        assert request.attributes["inferkit.model"] == "b"
        assert request.attributes["inferkit.arm"] == "v2"

    def test_a_refused_routed_request_leaves_no_choice_for_the_next_request(self, spans: Tracing) -> None:
        """The router's choice was kept for "the next request submitted" on the thread: when its arm refused
        the request (InvalidInput, before it had an id), the next direct request to another model was
        exported as the router's, with its arm."""
        router = Router({"v1": _double("a"), "v2": _double("b")}, ABTest({"v1": 0.0, "v2": 1.0}), name="r")
        with router, _double("other") as other:
            with pytest.raises(InvalidInput):
                router.predict(np.ones((1, 5), np.float32))
            other.predict(np.ones((1, 4), np.float32))
            router.submit(np.ones((1, 4), np.float32)).result(WAIT)
        requests = {
            s.attributes["inferkit.model"]: s.attributes for s in spans.named("inferkit.request") if s.attributes
        }
        assert "inferkit.router" not in requests["other"]
        assert (requests["b"]["inferkit.router"], requests["b"]["inferkit.arm"]) == ("r", "v2")

    def test_execution_timeout_ends_the_request(self, spans: Tracing) -> None:
        """A request whose model call hung past execution_timeout was never exported (no BatchDone ends it):
        it ends, ERROR, when its replica is replaced."""
        release = threading.Event()

        def hangs(x: np.ndarray) -> np.ndarray:
            if x[0, 0] < 0:
                release.wait(WAIT)
            return x * 2

        with _double(fn=hangs, execution_timeout=0.2) as predictor:
            try:
                with pytest.raises(ExecutionTimeout):
                    predictor.predict(-np.ones((1, 4), np.float32))
                end = time.monotonic() + WAIT
                while not spans.named("inferkit.request") and time.monotonic() < end:
                    time.sleep(0.01)  # ReplicaReplaced comes just after the caller has its error
            finally:
                release.set()
        request = spans.one("inferkit.request")
        assert request.status.status_code is StatusCode.ERROR
        assert "timed out" in (request.status.description or "")

    def test_split_request_later_batches_link_to_it(self, spans: Tracing) -> None:
        """A request over several batches ends with the first; the later batches were linked to nothing."""
        with _double(max_batch_size=4) as predictor:
            predictor.predict(np.ones((10, 4), np.float32))
        request = spans.one("inferkit.request")
        batches = spans.named("inferkit.batch")
        assert sorted(b.attributes["inferkit.rows"] for b in batches if b.attributes) == [2, 4, 4]
        for batch in batches:
            assert [link.context.span_id for link in batch.links] == [_ctx(request).span_id]

    def test_retried_request_ends_with_its_retry(self, spans: Tracing) -> None:
        """A request retried on another replica, and answered there, ended ERROR at its failed batch; it now stays
        open (an ``inferkit.retry`` event names the replica that failed) and ends OK with the retry's batch. Both
        batches link to it, and its queue span is recorded once."""
        failed = threading.Event()

        def fails_once(x: np.ndarray) -> np.ndarray:
            if not failed.is_set():
                failed.set()
                msg = "the first call fails"
                raise RuntimeError(msg)
            return x * 2

        with _double(fn=fails_once, replicas=2) as predictor:
            predictor.predict(np.ones((1, 4), np.float32))
            assert predictor.stats().retried == 1
        request = spans.one("inferkit.request")
        assert request.status.status_code is StatusCode.UNSET
        batches = sorted(spans.named("inferkit.batch"), key=lambda b: b.start_time or 0)
        assert len(batches) == 2
        first = (batches[0].attributes or {})["inferkit.replica"]
        assert [(e.name, dict(e.attributes or {})) for e in request.events] == [
            ("inferkit.retry", {"inferkit.replica": first})
        ]
        assert (batches[1].attributes or {})["inferkit.replica"] != first
        for batch in batches:
            assert [link.context.span_id for link in batch.links] == [_ctx(request).span_id]
        assert len(spans.named("inferkit.queue")) == 1

    def test_retried_request_that_fails_again_ends_in_error(self, spans: Tracing) -> None:
        """A retry that fails too ends the span ERROR, at the retry's batch."""

        def fails(x: np.ndarray) -> np.ndarray:
            msg = "every call fails"
            raise RuntimeError(msg)

        with _double(fn=fails, replicas=2) as predictor:
            with pytest.raises(ModelError):
                predictor.predict(np.ones((1, 4), np.float32))
            assert predictor.stats().retried == 1
        request = spans.one("inferkit.request")
        assert request.status.status_code is StatusCode.ERROR
        assert [e.name for e in request.events] == ["inferkit.retry"]
        assert len(spans.named("inferkit.batch")) == 2

    def test_uninstrument_stops_spans(self, spans: Tracing) -> None:
        """After uninstrument nothing more is traced; a bad bound fails at instrument."""
        tracing.uninstrument()
        assert not tracing.active()
        with _double() as predictor:
            predictor.predict(np.ones((1, 4), np.float32))
        assert spans.exporter.get_finished_spans() == ()
        with pytest.raises(ValueError, match="max_pending must be >= 1, got 0"):
            tracing.instrument(max_pending=0)


@pytest.fixture(name="server")
def _server() -> Iterator[InferenceServer]:
    server = InferenceServer(Repository({"m": _double()}), port=0, grpc_port=0, grace=WAIT).start()
    try:
        yield server
    finally:
        server.stop()
        server.join(WAIT)


class TestServer:
    def test_rest_traceparent(self, spans: Tracing, server: InferenceServer) -> None:
        """A REST request's traceparent becomes its request span's parent; the next request starts its own trace."""
        with httpx.Client(timeout=WAIT) as client:
            x = np.ones((2, 4), np.float32)
            assert _infer_json(client, server.port, "m", x, traceparent=TRACEPARENT).status_code == 200
            assert _infer_json(client, server.port, "m", x).status_code == 200  # same connection, no header
        first, second = sorted(spans.named("inferkit.request"), key=lambda s: s.start_time or 0)
        assert _ctx(first).trace_id == TRACE_ID
        assert first.parent is not None
        assert first.parent.span_id == PARENT_ID
        assert first.parent.is_remote
        assert _ctx(second).trace_id != TRACE_ID
        assert second.parent is None

    def test_grpc_traceparent(self, spans: Tracing, server: InferenceServer) -> None:
        """A gRPC request's traceparent metadata becomes its request span's parent."""
        with grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}") as client:
            x = grpcclient.InferInput("x", [2, 4], "FP32")
            x.set_data_from_numpy(np.ones((2, 4), np.float32))
            client.infer("m", [x], headers={"traceparent": TRACEPARENT})
        request = spans.one("inferkit.request")
        assert _ctx(request).trace_id == TRACE_ID
        assert request.parent is not None
        assert request.parent.span_id == PARENT_ID
        batch = spans.one("inferkit.batch")
        assert [link.context.trace_id for link in batch.links] == [TRACE_ID]


def test_nothing_imported_without_instrument() -> None:
    """``import inferkit`` (and routing a request) imports no OpenTelemetry module."""
    code = (
        "import sys, numpy as np, inferkit\n"
        "import inferkit.server.logs\n"
        "p = inferkit.Predictor.from_callable(lambda x: x, name='m')\n"
        "r = inferkit.Router({'a': p})\n"
        "r.predict(np.ones((1, 2), np.float32)); r.close()\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('opentelemetry', 'inferkit.tracing')))\n"
        "assert not bad, bad\n"
        "print('clean')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=WAIT, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "clean"
    assert trace is not None  # the test module itself has it, so the check above is a real one
