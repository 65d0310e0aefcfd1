"""Tests for inferkit.server.logs: the access log, model errors through the server, and the CLI's logging."""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from inferkit import Predictor, TensorSpec
from inferkit.server import Repository
from inferkit.server.run import InferenceServer
from tests.test_server_run import WAIT, _infer_json, _model, _start_cli

SPEC = TensorSpec("x", np.float32, (None, 4))


def _picky(x: np.ndarray) -> np.ndarray:
    if (x < 0).any():
        msg = "negative value in the batch"
        raise ValueError(msg)
    return x * 2


@pytest.fixture
def server() -> Iterator[InferenceServer]:
    predictor = Predictor.from_callable(
        _picky, name="m", inputs=[SPEC], outputs=[TensorSpec("y", np.float32, (None, 4))]
    )
    server = InferenceServer(Repository({"m": predictor}), port=0, grpc_port=0, grace=WAIT, access_log=True).start()
    try:
        yield server
    finally:
        server.stop()
        server.join(WAIT)


def _access(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "inferkit.access"]


class TestAccessLog:
    def test_rest_and_grpc_requests_each_log_one_line(
        self, server: InferenceServer, caplog: pytest.LogCaptureFixture
    ) -> None:
        """One access line per request over each face, with its id, model, protocol, status, rows and times."""
        caplog.set_level(logging.INFO, logger="inferkit")
        with httpx.Client(timeout=WAIT) as c:
            r = _infer_json(c, server.port, "m", np.ones((3, 4), np.float32))
        assert r.status_code == 200
        with grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}") as g:
            x = grpcclient.InferInput("x", [2, 4], "FP32")
            x.set_data_from_numpy(np.ones((2, 4), np.float32))
            answer = g.infer("m", [x], request_id="client-7")
        assert answer.get_response().id == "client-7"  # a client's id is echoed
        lines = _access(caplog)
        assert len(lines) == 2
        rest, grpc = lines
        for line, protocol, rows in ((rest, "rest", 3), (grpc, "grpc", 2)):
            assert f"protocol={protocol}" in line
            assert f"rows={rows}" in line
            assert "model=m" in line
            assert "status=success" in line
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            assert 0 <= float(fields["queue_s"]) < WAIT
            assert 0 < float(fields["compute_s"]) < WAIT
        ids = [line.split("request_id=")[1].split()[0] for line in lines]
        assert ids[0] != ids[1]
        assert all(int(i) > 2**32 for i in ids)  # the process prefix sits above the counter

    def test_model_error_logged_once_with_traceback(
        self, server: InferenceServer, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A model's exception is logged at WARNING with its traceback once; repeats are not, each still answered."""
        caplog.set_level(logging.INFO, logger="inferkit")
        with httpx.Client(timeout=WAIT) as c:
            codes = [_infer_json(c, server.port, "m", -np.ones((1, 4), np.float32)).status_code for _ in range(5)]
        with grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}") as g:
            x = grpcclient.InferInput("x", [1, 4], "FP32")
            x.set_data_from_numpy(-np.ones((1, 4), np.float32))
            with pytest.raises(InferenceServerException, match="negative value"):
                g.infer("m", [x])
        assert codes == [500] * 5
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert "Traceback (most recent call last)" in warnings[0]
        assert "ValueError: negative value in the batch" in warnings[0]
        assert sum("status=ModelError" in line for line in _access(caplog)) == 6

    def test_a_request_refused_while_others_queue_has_its_queue_time(self, caplog: pytest.LogCaptureFixture) -> None:
        """A request that ended without a batch (here refused, the queue full) logged ``queue_s=None``; its
        time until it ended is taken from its ``RequestsFailed``, as an expired one's from ``RequestsExpired``."""
        entered, release = threading.Event(), threading.Event()

        def gate(x: np.ndarray) -> np.ndarray:
            if not entered.is_set():
                entered.set()
                assert release.wait(WAIT)
            return x * 2

        caplog.set_level(logging.INFO, logger="inferkit")
        predictor = Predictor.from_callable(gate, name="m", inputs=[SPEC], outputs=[SPEC], max_queue_size=1)
        server = InferenceServer(Repository({"m": predictor}), port=0, grace=WAIT, access_log=True).start()
        codes: list[int] = []
        try:
            with httpx.Client(timeout=WAIT) as c:

                def send() -> None:
                    codes.append(_infer_json(c, server.port, "m", np.ones((1, 4), np.float32)).status_code)

                held = [threading.Thread(target=send) for _ in range(2)]
                held[0].start()
                assert entered.wait(WAIT)
                held[1].start()
                _wait_for(lambda: predictor.stats().queue_depth == 1)
                refused = _infer_json(c, server.port, "m", np.ones((1, 4), np.float32))
                release.set()
                for thread in held:
                    thread.join(WAIT)
                    assert not thread.is_alive()
        finally:
            release.set()
            server.stop()
            server.join(WAIT)
        assert refused.status_code == 503
        assert codes == [200, 200]
        (line,) = (line for line in _access(caplog) if "status=Overloaded" in line)
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        assert 0 <= float(fields["queue_s"]) < WAIT


def _wait_for(done: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not done():
        assert time.monotonic() < deadline
        time.sleep(0.005)


class TestCliLogging:
    def test_json_lines_with_access_log(self, tmp_path: Path) -> None:
        """``--log-format json --access-log``: every log line is a JSON object; one access line per request."""
        proc, port, _ = _start_cli(str(_model(tmp_path / "scale.onnx")), "--log-format", "json", "--access-log")
        try:
            with httpx.Client(timeout=WAIT) as c:
                assert _infer_json(c, port, "scale", np.ones((2, 4), np.float32)).status_code == 200
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=WAIT)
        lines = [line for line in err.splitlines() if line.startswith("{")]
        records = [json.loads(line) for line in lines]
        access = [r for r in records if r["event"] == "access"]
        assert len(access) == 1
        assert access[0]["model"] == "scale"
        assert access[0]["rows"] == 2
        assert access[0]["protocol"] == "rest"
        assert access[0]["level"] == "info"
        assert all(r["level"] != "debug" for r in records)
