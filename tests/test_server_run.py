"""The whole server: TOML config, the CLI, SIGTERM, and HTTP and gRPC clients batched together."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient
from onnx import TensorProto, helper
from tritonclient.utils import InferenceServerException

from inferkit import Predictor, Router, TensorSpec
from inferkit.server import Repository
from inferkit.server.config import ConfigError, load
from inferkit.server.run import InferenceServer, run_loop

WAIT = 60


def _model(path: Path, scale: float = 2.0) -> Path:
    """An ONNX model y = scale * x over float32 [N, 4]."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "k"], ["y"])],
        "scale",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [onnx.numpy_helper.from_array(np.array(scale, dtype=np.float32), "k")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), path)
    return path


def _infer_json(client: httpx.Client, port: int, model: str, x: np.ndarray, **headers: str) -> httpx.Response:
    body = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    return client.post(f"http://127.0.0.1:{port}/v2/models/{model}/infer", json=body, headers=headers)


class TestConfig:
    """The TOML configuration."""

    def test_models_versions_and_a_canary_split(self, tmp_path: Path) -> None:
        """A config with a plain model and a versioned one behind a canary loads both."""
        _model(tmp_path / "a.onnx")
        _model(tmp_path / "v1.onnx")
        _model(tmp_path / "v2.onnx", 3.0)
        (tmp_path / "models.toml").write_text(
            """
[server]
port = 9000
grpc_port = false

[[models]]
name = "plain"
path = "a.onnx"
max_batch_size = 8

[[models]]
name = "clf"
versions.1 = { path = "v1.onnx" }
versions.2 = { path = "v2.onnx", replicas = 2 }
split = { policy = "canary", baseline = "1", candidate = "2", steps = [0.5, 1.0], min_requests_per_step = 10 }
"""
        )
        config = load(tmp_path / "models.toml")
        try:
            assert (config.port, config.grpc_port) == (9000, None)
            repo = config.repository
            assert repo.names() == ["clf", "plain"]
            assert isinstance(repo.model("clf").target, Router)
            assert sorted(repo.model("clf").versions) == ["1", "2"]
            pinned = repo.resolve("clf", "2")
            assert isinstance(pinned, Predictor)
            np.testing.assert_allclose(pinned.predict(np.ones((1, 4), np.float32)), 3.0)
            assert len(pinned.stats().replicas) == 2
        finally:
            config.repository.close()

    @pytest.mark.parametrize(
        ("body", "message"),
        [
            ('[[models]]\nname = "m"\n', r"models\[0\].path is required"),
            (
                '[[models]]\nname = "m"\npath = "a.onnx"\nreplicas = 0\n',
                r"models\[0\]: replicas must be an int >= 1, got 0",
            ),
            ('[[models]]\nname = "m"\npath = "a.onnx"\nbogus = 1\n', r"models\[0\]: unknown field\(s\) \['bogus'\]"),
            ('[[models]]\nname = "m"\npath = "missing.onnx"\n', r"models\[0\].path: no model file"),
            ('[[models]]\npath = "a.onnx"\n', r"models\[0\].name must be a non-empty string"),
            (
                '[[models]]\nname = "m"\nversions.1 = { path = "a.onnx", max_batch_size = 0 }\n',
                r"models\[0\].versions.1: max_batch_size must be an int >= 1, got 0",
            ),
            (
                '[[models]]\nname = "m"\nversions.1 = { path = "a.onnx" }\nsplit = { policy = "zigzag" }\n',
                r"models\[0\].split.policy must be 'fixed', 'ab' or 'canary'",
            ),
            ('[[models]]\nname = "m"\npath = "a.onnx"\n[[models]]\nname = "m"\npath = "a.onnx"\n', "unique"),
            ("models = 3\n", r"models must be a non-empty array"),
            ("[[models]\n", "a.toml"),
        ],
    )
    def test_errors_name_the_field(self, tmp_path: Path, body: str, message: str) -> None:
        """A bad config raises ConfigError whose message names the field at fault."""
        _model(tmp_path / "a.onnx")
        (tmp_path / "a.toml").write_text(body)
        with pytest.raises(ConfigError, match=message):
            load(tmp_path / "a.toml")


def _start_cli(
    *args: str, ports: tuple[str, ...] = ("--port", "0", "--grpc-port", "0")
) -> tuple[subprocess.Popen[str], int, int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "inferkit.cli", "serve", *args, "--host", "127.0.0.1", *ports],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()
    found = re.search(r"http://127\.0\.0\.1:(\d+), grpc 127\.0\.0\.1:(\d+)", line)
    if found is None:
        proc.kill()
        proc.wait(WAIT)
        proc.stderr.close()
        pytest.fail(f"no start line from the CLI: {line!r} {proc.stderr.read()}")
    return proc, int(found.group(1)), int(found.group(2))


class TestCli:
    """``inferkit serve`` as a real process."""

    @pytest.mark.parametrize("options", [[], ["--grpc-listeners", "1", "--loop", "asyncio"]])
    def test_serve_answers_http_and_grpc_then_stops_on_sigterm_under_load(
        self, tmp_path: Path, options: list[str]
    ) -> None:
        """Under load from 8 HTTP and 4 gRPC clients, SIGTERM stops the server gracefully: every
        accepted request is answered (the clients' successes equal the server's completions) and
        none fails; with the default listeners and loop, and with one listener on asyncio's loop."""
        proc, port, grpc_port = _start_cli(str(_model(tmp_path / "scale.onnx")), "--max-batch-size", "16", *options)
        try:
            x = np.arange(8, dtype=np.float32).reshape(2, 4)
            with grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}") as g:
                assert g.is_server_ready()
                inp = grpcclient.InferInput("x", [2, 4], "FP32")
                inp.set_data_from_numpy(x)
                np.testing.assert_allclose(g.infer("scale", [inp]).as_numpy("y"), x * 2)
            ok = [0]
            bad: list[str] = []
            lock = threading.Lock()
            stop = threading.Event()

            def client() -> None:
                with httpx.Client(timeout=WAIT) as c:
                    for _ in range(100_000):
                        if stop.is_set():
                            return
                        try:
                            r = _infer_json(c, port, "scale", x)
                        except httpx.TransportError:
                            return  # refused or closed once shutdown began: never accepted
                        with lock:
                            if r.status_code == 200 and r.json()["outputs"][0]["data"] == (x * 2).ravel().tolist():
                                ok[0] += 1
                            else:
                                bad.append(f"{r.status_code} {r.text[:200]}")

            def grpc_client() -> None:
                with grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}") as g:
                    inp = grpcclient.InferInput("x", [2, 4], "FP32")
                    inp.set_data_from_numpy(x)
                    for _ in range(100_000):
                        if stop.is_set():
                            return
                        try:
                            y = g.infer("scale", [inp]).as_numpy("y")
                        except InferenceServerException as error:
                            if error.status() in ("StatusCode.UNAVAILABLE", "StatusCode.CANCELLED"):
                                return  # refused once shutdown began: never accepted
                            raise
                        with lock:
                            if np.array_equal(y, x * 2):
                                ok[0] += 1
                            else:
                                bad.append(f"grpc {y}")

            threads = [threading.Thread(target=client) for _ in range(8)]
            threads += [threading.Thread(target=grpc_client) for _ in range(4)]
            for t in threads:
                t.start()
            deadline = time.monotonic() + WAIT
            while ok[0] < 200 and time.monotonic() < deadline:
                time.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(WAIT) == 0
            stop.set()
            for t in threads:
                t.join(WAIT)
            assert proc.stderr is not None
            tail = proc.stderr.read()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(WAIT)
            if proc.stderr is not None:
                proc.stderr.close()
        found = re.search(r"accepted=(\d+) completed=(\d+) failed=(\d+) cancelled=(\d+) in_flight=(\d+)", tail)
        assert found is not None, tail
        accepted, completed, failed, cancelled, in_flight = map(int, found.groups())
        assert bad == []
        assert (failed, cancelled, in_flight) == (0, 0, 0)
        assert accepted == completed == ok[0] + 1  # + the gRPC request

    def test_config_grpc_port_zero_picks_a_free_port(self, tmp_path: Path) -> None:
        """``grpc_port = 0`` in a config serves gRPC on a free port (``false`` is what turns it off)."""
        _model(tmp_path / "scale.onnx")
        config = tmp_path / "models.toml"
        config.write_text('[server]\nport = 0\ngrpc_port = 0\n\n[[models]]\nname = "scale"\npath = "scale.onnx"\n')
        proc, _, grpc_port = _start_cli("--config", str(config), ports=())
        try:
            with grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}") as g:
                assert g.is_model_ready("scale")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(WAIT) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(WAIT)
            if proc.stderr is not None:
                proc.stderr.close()

    @pytest.mark.parametrize(
        ("args", "message"),
        [
            (["none.onnx"], "inferkit serve: no model file"),
            (["scale.onnx", "--grpc-listeners", "0"], "--grpc-listeners: must be >= 1, got 0"),
        ],
    )
    def test_bad_arguments(self, tmp_path: Path, args: list[str], message: str) -> None:
        """A missing model file or a bad flag exits 2 with a message."""
        _model(tmp_path / "scale.onnx")
        run = subprocess.run(
            [sys.executable, "-m", "inferkit.cli", "serve", str(tmp_path / args[0]), *args[1:]],
            capture_output=True,
            text=True,
            timeout=WAIT,
            check=False,
        )
        assert run.returncode == 2
        assert message in run.stderr


class TestMixedClients:
    """HTTP and gRPC clients share one Predictor's batches."""

    def test_64_clients_http_and_grpc(self) -> None:
        """32 HTTP and 32 gRPC clients: every response is right, and some batch mixes both protocols."""
        batches: list[np.ndarray] = []
        lock = threading.Lock()

        def model(x: np.ndarray) -> np.ndarray:
            with lock:
                batches.append(x[:, 0].copy())
            time.sleep(0.002)  # a model slow enough that requests queue behind it
            return x * 2

        spec = TensorSpec("x", np.float32, (None, 4))
        predictor = Predictor.from_callable(model, inputs=[spec], outputs=[TensorSpec("y", np.float32, (None, 4))])
        server = InferenceServer(Repository({"m": predictor}), port=0, grpc_port=0, grace=WAIT).start()
        errors: list[str] = []

        def http_client(i: int) -> None:
            with httpx.Client(timeout=WAIT) as c:
                for j in range(10):
                    x = np.full((1, 4), float(1000 + i * 10 + j), np.float32)  # positive: HTTP
                    r = _infer_json(c, server.port, "m", x)
                    if r.status_code != 200 or r.json()["outputs"][0]["data"] != (x * 2).ravel().tolist():
                        errors.append(f"http {r.status_code} {r.text[:100]}")

        def grpc_client(i: int) -> None:
            with grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}") as g:
                for j in range(10):
                    x = np.full((1, 4), -float(1000 + i * 10 + j), np.float32)  # negative: gRPC
                    inp = grpcclient.InferInput("x", [1, 4], "FP32")
                    inp.set_data_from_numpy(x)
                    y: Any = g.infer("m", [inp]).as_numpy("y")
                    if not np.array_equal(y, x * 2):
                        errors.append(f"grpc {y}")

        threads = [threading.Thread(target=http_client, args=(i,)) for i in range(32)]
        threads += [threading.Thread(target=grpc_client, args=(i,)) for i in range(32)]
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join(WAIT)
        finally:
            server.join(WAIT)
        assert errors == []
        assert sum(len(b) for b in batches) == 640
        assert any((b > 0).any() and (b < 0).any() for b in batches)


class TestLoop:
    """The event loop the server runs on."""

    @pytest.mark.parametrize(("loop", "module"), [("asyncio", "asyncio"), ("auto", "uvloop"), ("uvloop", "uvloop")])
    def test_run_loop_picks_the_loop(self, loop: str, module: str) -> None:
        """``auto`` and ``uvloop`` run on uvloop (installed with the server extra), ``asyncio`` on asyncio's own."""
        if module == "uvloop":
            pytest.importorskip("uvloop", reason="uvloop is not built for this platform")

        async def which() -> str:
            return type(asyncio.get_running_loop()).__module__

        assert run_loop(which(), loop).split(".")[0] == module

    def test_an_unknown_loop_is_refused(self) -> None:
        """A loop name outside LOOPS fails at construction, naming the choices."""
        predictor = Predictor.from_callable(lambda x: x, inputs=[TensorSpec("x", np.float32, (None, 4))])
        try:
            with pytest.raises(ValueError, match="loop must be one of"):
                InferenceServer(Repository({"m": predictor}), loop="trio")
        finally:
            predictor.close(WAIT)
