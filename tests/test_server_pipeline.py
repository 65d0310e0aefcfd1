"""Tests for the server's one request pipeline (``inferkit.server.pipeline``) and what it relies on."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from inferkit import Closed, Fixed, ModelError, Predictor, Router, TensorSpec
from inferkit.routing import Predictive
from inferkit.server import Repository
from inferkit.server.repository import Failed
from inferkit.server.run import InferenceServer
from tests.test_server_run import WAIT

X = TensorSpec("x", np.float32, (None, 4))
Y = TensorSpec("y", np.float32, (None, 4))


def _broken(a: np.ndarray) -> np.ndarray:
    msg = "the model broke"
    raise RuntimeError(msg)


class TestFailed:
    """A failed request comes back as a typed error that carries the arm that had it."""

    def test_a_routed_failure_names_its_arm(self) -> None:
        """The model's error keeps its type and the arm rides beside it, not written onto it."""
        router = Router(
            {"v1": Predictor.from_callable(lambda a: a), "v2": Predictor.from_callable(_broken)}, Fixed("v2")
        )
        repository = Repository({"m": router})
        try:
            with pytest.raises(Failed) as caught:
                asyncio.run(repository.infer("m", None, {"x": np.ones((1, 2))}))
            assert isinstance(caught.value.error, ModelError)
            assert caught.value.arm == "v2"
            assert not hasattr(caught.value.error, "arm")
        finally:
            repository.close()

    def test_an_unrouted_failure_has_no_arm(self) -> None:
        """Without a Router the arm is ``None``."""
        repository = Repository({"m": Predictor.from_callable(_broken)})
        try:
            with pytest.raises(Failed) as caught:
                asyncio.run(repository.infer("m", None, {"x": np.ones((1, 2))}))
            assert isinstance(caught.value.error, ModelError)
            assert caught.value.arm is None
        finally:
            repository.close()


class _Answers42:
    """A Predictive whose result is not outputs at all: a bug the server must still answer."""

    signature = None
    ready = True

    def predict(self, x: Any, *, timeout: float | None = None, priority: int = 0) -> Any:
        return 42

    def submit(self, x: Any, *, timeout: float | None = None, priority: int = 0) -> Future[Any]:
        future: Future[Any] = Future()
        future.set_result(42)
        return future

    def stats(self) -> Any:
        return None

    def close(self, timeout: float | None = None) -> None:
        pass


class _Counting(Repository):
    """A repository that counts how often a model is resolved."""

    def __init__(self, models: dict[str, Predictive]) -> None:
        super().__init__(models)
        self.resolved = 0

    def resolve(self, name: str, version: str | None = None) -> Predictive:
        self.resolved += 1
        return super().resolve(name, version)


def _start(repository: Repository) -> InferenceServer:
    return InferenceServer(repository, port=0, grpc_port=0, grace=WAIT).start()


@pytest.fixture(name="served")
def _served() -> Iterator[tuple[InferenceServer, _Counting]]:
    model = Predictor.from_callable(lambda x: x * 2, name="m", inputs=[X], outputs=[Y])
    repository = _Counting({"m": model, "bug": _Answers42()})
    server = _start(repository)
    try:
        yield server, repository
    finally:
        server.stop()
        server.join(WAIT)
        repository.close(WAIT)


def _rest(server: InferenceServer, model: str, **extra: Any) -> httpx.Response:
    x = np.ones((2, 4), np.float32)
    body = {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": x.ravel().tolist()}], **extra}
    with httpx.Client(timeout=WAIT) as client:
        return client.post(f"http://127.0.0.1:{server.port}/v2/models/{model}/infer", json=body)


def _grpc(server: InferenceServer, model: str, *outputs: str) -> Any:
    x = grpcclient.InferInput("x", [2, 4], "FP32")
    x.set_data_from_numpy(np.ones((2, 4), np.float32))
    wanted = [grpcclient.InferRequestedOutput(o) for o in outputs] or None
    with grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}") as client:
        return client.infer(model, [x], outputs=wanted)


def _requests_total(server: InferenceServer, model: str, outcome: str) -> float:
    with httpx.Client(timeout=WAIT) as client:
        text = client.get(f"http://127.0.0.1:{server.port}/metrics").text
    line = f'inferkit_requests_total{{arm="",model="{model}",outcome="{outcome}"}} '
    values = [float(row.removeprefix(line)) for row in text.splitlines() if row.startswith(line)]
    return values[0] if values else 0.0


class TestOnePipeline:
    """Both faces go through one pipeline: one resolve, one wording, one log of a bug, one count."""

    def test_a_request_resolves_its_model_once(self, served: tuple[InferenceServer, _Counting]) -> None:
        """A request that names its outputs looks its model up once, over REST and over gRPC."""
        server, repository = served
        before = repository.resolved
        response = _rest(server, "m", outputs=[{"name": "y"}])
        assert response.status_code == 200, response.text
        assert repository.resolved - before == 1
        before = repository.resolved
        answer = _grpc(server, "m", "y")
        np.testing.assert_array_equal(answer.as_numpy("y"), np.full((2, 4), 2, np.float32))
        assert repository.resolved - before == 1

    def test_an_unexpected_error_is_answered_logged_and_counted_alike(
        self, served: tuple[InferenceServer, _Counting], caplog: pytest.LogCaptureFixture
    ) -> None:
        """A bug is a 500 and INTERNAL with the same words, logged with its traceback and counted, on both faces."""
        server, _ = served
        caplog.set_level(logging.ERROR, logger="inferkit.server.pipeline")
        response = _rest(server, "bug")
        with pytest.raises(InferenceServerException) as caught:
            _grpc(server, "bug")
        assert response.status_code == 500
        assert response.json()["error"].startswith("internal error: TypeError: ")
        assert caught.value.status() == "StatusCode.INTERNAL"
        assert caught.value.message() == response.json()["error"]
        logged = [r for r in caplog.records if r.name == "inferkit.server.pipeline"]
        assert len(logged) == 2
        assert all(r.exc_info is not None and r.exc_info[0] is TypeError for r in logged)
        assert _requests_total(server, "bug", "TypeError") == 2


class TestRefusals:
    """A request refused at the door comes back as ``Failed`` like any other failure."""

    def test_a_closed_model_refuses_with_failed(self) -> None:
        """``Closed`` from submit is wrapped, with no arm: the request never reached one."""
        predictor = Predictor.from_callable(lambda a: a)
        repository = Repository({"m": predictor})
        predictor.close()
        with pytest.raises(Failed) as caught:
            asyncio.run(repository.infer("m", None, {"x": np.ones((1, 2))}))
        assert isinstance(caught.value.error, Closed)
        assert caught.value.arm is None


class TestHeavyRequestsLeaveTheLoop:
    """A request of many strings is handed to its model on a worker thread (admission walks each one)."""

    def test_one_of_many_strings_is_answered_and_one_whose_caller_left_never_runs(self) -> None:
        """Past LOOP_OBJECTS object elements, submission runs off the event loop: the request is answered
        exactly; and a caller cancelled while it was being handed over has it cancelled once queued."""
        from fakes import BLOCK, Model

        from inferkit.server.submission import LOOP_OBJECTS, heavy, submitted

        model = Model()
        strings = np.array([b"s%d" % i for i in range(LOOP_OBJECTS + 10)], dtype=object).reshape(-1, 1)
        echo = Predictor.from_callable(lambda x: x, max_batch_size=4096)
        gated = Predictor.from_callable(model, max_batch_size=4096)

        assert heavy({"x": strings})
        assert not heavy({"x": strings[:LOOP_OBJECTS]})

        async def main() -> None:
            answered = await asyncio.wrap_future(await submitted(echo, {"x": strings}, None, None, 0))
            np.testing.assert_array_equal(answered, strings)
            blocker = gated.submit(np.full((1, 3), BLOCK))
            assert await asyncio.to_thread(model.entered.wait, WAIT)
            rows = np.full((LOOP_OBJECTS + 10, 1), b"r", dtype=object)
            handing = asyncio.ensure_future(submitted(gated, {"x": rows}, None, None, 0))
            await asyncio.sleep(0)  # the worker thread has it
            handing.cancel()
            with pytest.raises(asyncio.CancelledError):
                await handing
            for _ in range(int(WAIT / 0.01)):  # the thread queues it, then it is cancelled
                if gated.stats().cancelled:
                    break
                await asyncio.sleep(0.01)
            model.release.set()
            await asyncio.wrap_future(blocker)

        try:
            asyncio.run(main())
            stats = gated.stats()
            assert (stats.cancelled, stats.completed) == (1, 1)
            assert len(model.batches) == 1  # only the blocker ran
        finally:
            model.release.set()
            echo.close(WAIT)
            gated.close(WAIT)
