"""Tests for inferkit.tracing: requests that end without a batch (refused, cancelled, failed unrun) are exported."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from typing import Self

import numpy as np
import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import StatusCode

import inferkit
from inferkit import Closed, ExecutionTimeout, NoHealthyReplica, Overloaded, Predictor, events
from tests.test_server_run import WAIT
from tests.test_tracing import SPEC, Tracing, _ctx, _double, traced

X = np.ones((1, 4), np.float32)
MAX_PENDING = 4  # requests whose spans may be open at once: fewer than a flood of refused ones


@pytest.fixture(name="spans")
def _spans() -> Iterator[Tracing]:
    with traced(max_pending=MAX_PENDING) as spans:
        yield spans


class Gate:
    """A model that blocks on its first call until opened (or left as a context); ``entered`` once that call runs."""

    def __init__(self) -> None:
        self.entered, self.open = threading.Event(), threading.Event()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if not self.entered.is_set():
            self.entered.set()
            assert self.open.wait(WAIT)
        return x * 2

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.open.set()  # before the predictor's close, which waits for the call it holds


@pytest.fixture(name="gate")
def _gate() -> Iterator[Gate]:
    gate = Gate()
    try:
        yield gate
    finally:
        gate.open.set()


def _status(span: ReadableSpan) -> tuple[StatusCode, str]:
    return span.status.status_code, span.status.description or ""


def _by_id(spans: Tracing) -> dict[int, ReadableSpan]:
    found = {}
    for span in spans.named("inferkit.request"):
        assert span.attributes is not None
        found[int(span.attributes["inferkit.request_id"])] = span  # type: ignore[arg-type]
    return found


class TestRefused:
    def test_overloaded_flood_is_exported_and_evicts_no_one(self, spans: Tracing, gate: Gate) -> None:
        """Requests refused with Overloaded were never exported, and a flood of them evicted (dropped unexported)
        the spans of accepted requests still waiting: each refused one now ends at once, ERROR, naming the error."""
        with _double(fn=gate, max_queue_size=1) as predictor, gate:
            running = predictor.submit(X)
            assert gate.entered.wait(WAIT)
            queued = predictor.submit(X)
            for _ in range(20):
                with pytest.raises(Overloaded):
                    predictor.submit(X)
            refused = spans.named("inferkit.request")  # exported before submit raised: nothing to wait for
            assert len(refused) == 20
            for span in refused:
                assert span.attributes is not None
                assert span.attributes["error.type"] == "Overloaded"
                code, why = _status(span)
                assert code is StatusCode.ERROR
                assert why.startswith("Overloaded: queue is full")
            gate.open.set()
            running.result(WAIT)
            queued.result(WAIT)
            assert predictor.stats().rejected == {"Overloaded": 20}
        served = _by_id(spans)
        assert len(served) == 22
        for future in (running, queued):
            assert _status(served[future.request_id])[0] is StatusCode.UNSET
        last = max(spans.named("inferkit.batch"), key=lambda b: b.start_time or 0)
        assert [link.context.span_id for link in last.links] == [_ctx(served[queued.request_id]).span_id]

    def test_closed_and_never_fitting(self, spans: Tracing) -> None:
        """A request refused by a closed predictor (Closed), or one no queue could ever hold (InvalidInput after
        it had its id), ends ERROR at once."""
        predictor = _double(max_batch_size=2, max_queue_size=2)
        with predictor, pytest.raises(inferkit.InvalidInput):
            predictor.predict(np.ones((9, 4), np.float32))  # 5 batches: more than half the queue
        with pytest.raises(Closed):
            predictor.predict(X)
        with pytest.raises(Closed):
            predictor.submit(X)
        kinds = sorted(s.attributes["error.type"] for s in spans.named("inferkit.request") if s.attributes)
        assert kinds == ["Closed", "Closed", "InvalidInput"]
        assert all(_status(s)[0] is StatusCode.ERROR for s in spans.named("inferkit.request"))


class TestFailedUnrun:
    def test_cancelled_while_queued(self, spans: Tracing, gate: Gate) -> None:
        """A request its caller cancelled while it was queued ends ERROR (CancelledError) when cancelled."""
        with _double(fn=gate) as predictor, gate:
            running = predictor.submit(X)
            assert gate.entered.wait(WAIT)
            queued = predictor.submit(X)
            assert queued.cancel()
            span = _by_id(spans)[queued.request_id]
            assert _status(span) == (StatusCode.ERROR, "CancelledError: cancelled by its caller while queued")
            gate.open.set()
            running.result(WAIT)
        assert _status(_by_id(spans)[running.request_id])[0] is StatusCode.UNSET

    def test_no_healthy_replica_while_queued(self, spans: Tracing, gate: Gate) -> None:
        """Requests queued when the only replica hung and its replacement failed to load end ERROR, NoHealthyReplica."""

        def factory() -> Gate:
            if gate.entered.is_set():  # the hung replica's replacement
                msg = "the model file is gone"
                raise OSError(msg)
            return gate

        predictor = Predictor.from_callable(
            factory=factory, inputs=[SPEC], outputs=[SPEC], execution_timeout=0.2, name="m"
        )
        with predictor, gate:
            running = predictor.submit(X)
            assert gate.entered.wait(WAIT)
            queued = [predictor.submit(X) for _ in range(3)]
            assert isinstance(running.exception(WAIT), ExecutionTimeout)
            for future in queued:
                assert isinstance(future.exception(WAIT), NoHealthyReplica)
            gate.open.set()
        found = _by_id(spans)
        for future in queued:
            code, why = _status(found[future.request_id])
            assert code is StatusCode.ERROR
            assert why == "NoHealthyReplica: no healthy replica of 'm'"

    def test_closed_by_close_timeout(self, spans: Tracing, gate: Gate) -> None:
        """close(timeout) giving up fails what is queued and what runs with Closed: both end ERROR (Closed)."""
        predictor = _double(fn=gate)
        running = predictor.submit(X)
        assert gate.entered.wait(WAIT)
        queued = predictor.submit(X)
        predictor.close(0.05)
        gate.open.set()
        for future in (running, queued):
            assert isinstance(future.exception(WAIT), Closed)
        found = _by_id(spans)
        assert _status(found[queued.request_id]) == (
            StatusCode.ERROR,
            "Closed: predictor 'm' closed before the request ran",
        )
        code, why = _status(found[running.request_id])
        assert (code, why) == (StatusCode.ERROR, f"Closed: predictor 'm' closed while request {running.request_id} ran")


class TestEvent:
    def test_told_to_the_predictors_observers(self, gate: Gate) -> None:
        """A refusal is told to the predictor's own observers as RequestsFailed, with its error's type and message."""
        seen: list[events.Event] = []
        with _double(fn=gate, max_queue_size=1, observers=[seen.append]) as predictor, gate:
            predictor.submit(X)
            assert gate.entered.wait(WAIT)
            predictor.submit(X)
            with pytest.raises(Overloaded) as refused:
                predictor.submit(X)
            gate.open.set()
        failed = [e for e in seen if isinstance(e, events.RequestsFailed)]
        assert len(failed) == 1
        assert failed[0].error_type == "Overloaded"
        assert failed[0].message == str(refused.value)
        assert failed[0].name == "m"


class TestLastGaps:
    def test_a_batch_key_that_raises_ends_its_span(self, spans: Tracing) -> None:
        """A batch key function (``key_by``) that raised as its request was queued left the request's span open
        (``Submitted``, no end): it now ends ERROR, named by the key's error, and the error reaches the caller."""

        def key(inputs: dict[str, np.ndarray]) -> object:
            if (inputs["x"] < 0).any():
                msg = "no key for negative rows"
                raise ValueError(msg)
            return None

        with _double() as predictor:
            predictor._batcher.key_by(key)
            with pytest.raises(ValueError, match="no key for negative rows"):
                predictor.submit(-X)
            kept = predictor.submit(X)
            np.testing.assert_array_equal(kept.result(WAIT), X * 2)
        found = _by_id(spans)
        assert len(found) == 2
        assert _status(found[kept.request_id])[0] is StatusCode.UNSET
        (refused,) = (s for i, s in found.items() if i != kept.request_id)
        assert refused.attributes is not None
        assert refused.attributes["error.type"] == "ValueError"
        assert _status(refused) == (StatusCode.ERROR, "ValueError: no key for negative rows")

    def test_a_forked_childs_refused_requests_end_their_spans(self) -> None:
        """In a forked child a predictor built before the fork refuses with Closed; each request had its id
        (``Submitted``) first and its span was never ended: now both end ERROR (Closed)."""
        code = textwrap.dedent(_FORK_SCRIPT)
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.split("\n")[:2] == ["child ERROR Closed ERROR Closed", "parent 0"]

    def test_an_interrupt_on_the_callers_thread_ends_its_span_in_error(self, spans: Tracing) -> None:
        """A KeyboardInterrupt out of a model call on the caller's (main) thread fails the request, but its
        BatchDone named no failed request: the span ended UNSET. It now ends ERROR, and the replica is no
        worse for it (no failed batch counted; it serves the next request)."""
        calls: list[np.ndarray] = []

        def fn(x: np.ndarray) -> np.ndarray:
            calls.append(x)
            if len(calls) == 1:
                raise KeyboardInterrupt
            return x * 2

        with _double(fn=fn, max_delay_ms=0) as predictor:
            with pytest.raises(KeyboardInterrupt):
                predictor.predict(X)  # on the main thread: run alone on it
            np.testing.assert_array_equal(predictor.predict(X, timeout=WAIT), X * 2)
            replica = predictor.stats().replicas[0]
            assert (replica.failed_batches, replica.state) == (0, "healthy")
        interrupted, served = sorted(_by_id(spans).items())
        assert _status(interrupted[1]) == (StatusCode.ERROR, "the model failed on this request")
        assert _status(served[1])[0] is StatusCode.UNSET


_FORK_SCRIPT = """
import os, numpy as np, inferkit
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from inferkit import tracing
p = inferkit.Predictor.from_callable(lambda x: x * 2, name="pre")
pid = os.fork()
if pid == 0:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.instrument(provider)
    for run in (p.predict, p.submit):
        try:
            run(np.ones((1, 2)))
        except inferkit.Closed:
            pass
    ended = [s for s in exporter.get_finished_spans() if s.name == "inferkit.request"]
    print("child", *(f"{s.status.status_code.name} {s.attributes['error.type']}" for s in ended), flush=True)
    os._exit(0)
_, status = os.waitpid(pid, 0)
print("parent", os.waitstatus_to_exitcode(status))
p.close()
"""
