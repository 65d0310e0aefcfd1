"""The whole server: TOML config, the CLI, SIGTERM, and HTTP and gRPC clients batched together."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient
from onnx import TensorProto, helper
from tritonclient.utils import InferenceServerException

from inferkit import Closed, PoolConfig, Predictor, Router, TensorSpec
from inferkit.server import Repository
from inferkit.server.config import ConfigError, load
from inferkit.server.connections import default_max_connections
from inferkit.server.limits import ConnectionLimits
from inferkit.server.run import InferenceServer, raise_open_file_limit, run_loop

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


def _spinning(path: Path) -> Path:
    """An ONNX model y = x after looping max(n) times: a call runs as long as its request asks."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["c_in"], ["c_out"]), helper.make_node("Identity", ["v_in"], ["v_out"])],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, None),
        ],
        [
            helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, None),
        ],
    )
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMax", ["n"], ["m"], keepdims=0),
            helper.make_node("Loop", ["m", "", "x"], ["y"], body=body),
        ],
        "spin",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("n", TensorProto.INT64, ["N", 1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
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

    def test_ejection_and_connection_settings(self, tmp_path: Path) -> None:
        """Ejection settings per model and per version, and connection limits and grace in [server]."""
        _model(tmp_path / "a.onnx")
        (tmp_path / "models.toml").write_text(
            """
[server]
grace_s = 7
header_timeout_s = 2.5
max_connections = 100
grpc_message_timeout_s = 5

[[models]]
name = "plain"
path = "a.onnx"
replicas = 2
execution_timeout = 3.0
eject_after = 2
cooldown = 1.5
max_cooldown = 9.0
max_ejected_fraction = 1.0

[[models]]
name = "clf"
versions.1 = { path = "a.onnx", eject_after = 7 }
"""
        )
        config = load(tmp_path / "models.toml")
        try:
            assert config.grace_s == 7
            assert config.limits == ConnectionLimits(
                header_timeout_s=2.5, max_connections=100, grpc_message_timeout_s=5
            )
            plain = config.repository.resolve("plain")
            assert isinstance(plain, Predictor)
            assert plain.pool == PoolConfig(
                replicas=2,
                execution_timeout=3.0,
                eject_after=2,
                cooldown=1.5,
                max_cooldown=9.0,
                max_ejected_fraction=1.0,
            )
            version = config.repository.resolve("clf", "1")
            assert isinstance(version, Predictor)
            assert version.pool == PoolConfig(eject_after=7)
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
            (  # derived from max_batch_size, not a setting
                '[[models]]\nname = "m"\npath = "a.onnx"\ncall_rows = 8\n',
                r"models\[0\]: unknown field\(s\) \['call_rows'\]",
            ),
            ('[[models]]\nname = "m"\npath = "missing.onnx"\n', r"models\[0\].path: no model file"),
            ('[[models]]\npath = "a.onnx"\n', r"models\[0\].name: a model name must be a non-empty printable"),
            *(  # served, but unreachable over REST: a '/' splits the path, clients resolve '..' away
                (f'[[models]]\nname = "{name}"\npath = "a.onnx"\n', rf"models\[0\].name: .* got '{re.escape(name)}'")
                for name in ("a/b", "..", ".", "a\\tb")
            ),
            (  # served, but its percent-encoded URL outgrew the request-head limit (431)
                f'[[models]]\nname = "{"é" * 513}"\npath = "a.onnx"\n',
                r"models\[0\].name: a model name must be at most 1024 bytes in UTF-8, got 1026",
            ),
            (
                '[[models]]\nname = "m"\nversions."a/b" = { path = "a.onnx" }\n',
                r"models\[0\].versions.a/b: a version label must be .* got 'a/b'",
            ),
            (  # a pybind11 "incompatible function arguments" dump
                '[[models]]\nname = "m"\npath = "a.onnx"\nintra_op_threads = "x"\n',
                r"models\[0\]: intra_op_threads must be an int >= 0 .* got 'x'",
            ),
            (  # three lines of pybind11's "incompatible function arguments"
                '[[models]]\nname = "m"\npath = "a.onnx"\nintra_op_threads = 100000000000\n',
                r"models\[0\]: intra_op_threads must be an int >= 0 .* and at most \d+, got 100000000000$",
            ),
            (  # "[Errno 21] Is a directory", naming no field
                (
                    '[[models]]\nname = "m"\nversions.1 = { path = "a.onnx" }\nversions.2 = { path = "a.onnx" }\n'
                    'split = { policy = "canary", baseline = "1", candidate = "2", state_path = "." }\n'
                ),
                r"models\[0\].split.state_path: the canary's state cannot be kept at .*: Is a directory",
            ),
            (
                '[[models]]\nname = "m"\nversions.1 = { path = "a.onnx", max_batch_size = 0 }\n',
                r"models\[0\].versions.1: max_batch_size must be an int >= 1, got 0",
            ),
            (
                '[[models]]\nname = "m"\nversions.1 = { path = "a.onnx" }\nsplit = { policy = "zigzag" }\n',
                r"models\[0\].split.policy must be 'fixed', 'ab' or 'canary'",
            ),
            *(  # ignored: the highest version took every request
                (
                    f'[[models]]\nname = "m"\nversions.1 = {{ path = "a.onnx" }}\nsplit = {split}\n',
                    message,
                )
                for split, message in [
                    ("{}", r"models\[0\].split.policy must be 'fixed', 'ab' or 'canary', got None"),
                    ("false", r"models\[0\].split must be a table, got bool"),
                    ("[]", r"models\[0\].split must be a table, got list"),
                ]
            ),
            *(  # float() took true as 1 and "0.5" as 0.5
                (
                    (
                        '[[models]]\nname = "m"\nversions.1 = { path = "a.onnx" }\nversions.2 = { path = "a.onnx" }\n'
                        f'split = {{ policy = "ab", weights = {{ "1" = 1, "2" = {weight} }} }}\n'
                    ),
                    rf"models\[0\].split.weights.2 must be a number, got {re.escape(shown)}",
                )
                for weight, shown in [("true", "True"), ("false", "False"), ('"0.5"', "'0.5'"), ("[1]", "[1]")]
            ),
            (  # tuple("abc") made steps of characters
                (
                    '[[models]]\nname = "m"\nversions.1 = { path = "a.onnx" }\nversions.2 = { path = "a.onnx" }\n'
                    'split = { policy = "canary", baseline = "1", candidate = "2", steps = "abc" }\n'
                ),
                r"models\[0\].split.steps must be a list of weights",
            ),
            ('[[models]]\nname = "m"\npath = "a.onnx"\n[[models]]\nname = "m"\npath = "a.onnx"\n', "unique"),
            ("models = 3\n", r"models must be a non-empty array"),
            ("[[models]\n", "a.toml"),
            (
                '[[models]]\nname = "m"\npath = "a.onnx"\neject_after = 0\n',
                r"models\[0\]: eject_after must be an int >= 1, got 0",
            ),
            (
                '[[models]]\nname = "m"\nversions.1 = { path = "a.onnx", max_ejected_fraction = 2 }\n',
                r"models\[0\].versions.1: max_ejected_fraction must be in \(0, 1\], got 2",
            ),
            (
                '[server]\nheader_timeout_s = -1\n[[models]]\nname = "m"\npath = "a.onnx"\n',
                r"server: header_timeout_s must be a finite number > 0, got -1",
            ),
            (
                '[server]\nbogus = 1\n[[models]]\nname = "m"\npath = "a.onnx"\n',
                r"server: unknown field\(s\) \['bogus'\]",
            ),
            ('[server]\ngrace_s = "x"\n[[models]]\nname = "m"\npath = "a.onnx"\n', r"server: grace_s must be"),
            *(  # str() made 5 the address 0.0.0.5, true the name "True"
                (f'[server]\nhost = {host}\n[[models]]\nname = "m"\npath = "a.onnx"\n', r"server.host must be a string")
                for host in ("5", "true", "[1]")
            ),
            (  # an OverflowError traceback when the shutdown joined a thread
                '[server]\ngrace_s = 1e300\n[[models]]\nname = "m"\npath = "a.onnx"\n',
                r"server: grace_s must be a number from 0 to 86400 \(a day\), got 1e\+300",
            ),
            *(  # an OverflowError traceback when gRPC started
                (f'[server]\n{key} = {value}\n[[models]]\nname = "m"\npath = "a.onnx"\n', rf"server: {key} must be")
                for key, value in [
                    ("grpc_idle_s", "2592000"),
                    ("grpc_max_concurrent_streams", "2147483648"),
                    ("max_header_bytes", "2147483648"),
                ]
            ),
            *(
                (
                    f'[server]\n{key} = {value}\n[[models]]\nname = "m"\npath = "a.onnx"\n',
                    rf"server.{key} must be a port",
                )
                for key, value in [
                    ("port", "99999999"),  # the socket wrapped it: 57599
                    ("grpc_port", "70000"),
                    ("port", "true"),  # int() made it port 1
                    ("port", "8123.9"),
                    ("port", '"36875"'),
                    ("port", "[1]"),  # a TypeError traceback
                    ("grpc_port", "-1"),  # a RuntimeError traceback (false turns gRPC off)
                ]
            ),
        ],
    )
    def test_errors_name_the_field(self, tmp_path: Path, body: str, message: str) -> None:
        """A bad config raises ConfigError whose message names the field at fault."""
        _model(tmp_path / "a.onnx")
        (tmp_path / "a.toml").write_text(body)
        with pytest.raises(ConfigError, match=message):
            load(tmp_path / "a.toml")

    @pytest.mark.parametrize(
        "body",
        [
            "x = " + "[" * 100_000 + "]" * 100_000 + "\n",
            "x = " + "{a=" * 3000 + "1" + "}" * 3000 + "\n",
            '[[models]]\nname = "m"\npath = "a.onnx"\nautoscale = ' + "{a=" * 1000 + "1" + "}" * 1000 + "\n",
        ],
    )
    def test_values_nested_too_deep_are_refused(self, tmp_path: Path, body: str) -> None:
        """Arrays or inline tables nested thousands deep: a RecursionError traceback, now a ConfigError."""
        (tmp_path / "a.toml").write_text(body)
        with pytest.raises(ConfigError, match=r"a.toml: values nested too deep"):
            load(tmp_path / "a.toml")

    def test_only_a_small_regular_utf8_file_is_read(self, tmp_path: Path) -> None:
        """A FIFO blocked, /dev/zero read until memory ran out, other bytes than UTF-8 were a
        UnicodeDecodeError naming no file: each is refused before or while it is read, naming it."""
        from inferkit.server.config import MAX_CONFIG_BYTES

        os.mkfifo(tmp_path / "fifo")  # no writer: opening it would block
        (tmp_path / "big.toml").write_text("# " + "x" * MAX_CONFIG_BYTES + "\n")
        (tmp_path / "latin1.toml").write_bytes(b'# caf\xe9\n[[models]]\nname = "m"\npath = "a.onnx"\n')
        cases = [
            (tmp_path / "fifo", "fifo is not a regular file"),
            (Path("/dev/zero"), "/dev/zero is not a regular file"),
            (tmp_path, "is not a regular file"),
            (tmp_path / "big.toml", f"big.toml is larger than {MAX_CONFIG_BYTES} bytes"),
            (tmp_path / "latin1.toml", "latin1.toml is not UTF-8 text"),
            (tmp_path / "none.toml", "none.toml: No such file or directory"),
        ]
        for path, message in cases:
            with pytest.raises(ConfigError, match=re.escape(message)):
                load(path)


def _start_cli(
    *args: str,
    ports: tuple[str, ...] = ("--port", "0", "--grpc-port", "0"),
    preexec_fn: Callable[[], None] | None = None,
) -> tuple[subprocess.Popen[str], int, int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "inferkit.cli", "serve", *args, "--host", "127.0.0.1", *ports],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        preexec_fn=preexec_fn,  # noqa: PLW1509 (it only sets a resource limit)
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


def _reap(proc: subprocess.Popen[str]) -> None:
    """Kill the CLI's process if it still runs, and close its stderr pipe."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(WAIT)
    if proc.stderr is not None:
        proc.stderr.close()


class TestCli:
    """``inferkit serve`` as a real process."""

    @pytest.mark.parametrize("options", [[], ["--grpc-listeners", "1", "--loop", "asyncio"]])
    def test_serve_answers_http_and_grpc_then_stops_on_sigterm_under_load(
        self, tmp_path: Path, options: list[str]
    ) -> None:
        """Under load from 8 HTTP and 4 gRPC clients and one slow upload, SIGTERM drains both
        protocols within the grace period: every accepted request is answered (the clients'
        successes equal the server's completions), a request sent before the signal is never
        reset and no gRPC call ends CANCELLED (later ones get 503 or UNAVAILABLE), and the
        process exits although the upload never finishes; with the default listeners and loop,
        and with one listener on asyncio's loop."""
        grace = 3.0
        args = (str(_model(tmp_path / "scale.onnx")), "--max-batch-size", "16", "--grace", str(grace), *options)
        proc, port, grpc_port = _start_cli(*args)
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        ok = [0]
        bad: list[str] = []
        lock = threading.Lock()
        signalled = threading.Event()
        stop = threading.Event()

        def client() -> None:
            with httpx.Client(timeout=WAIT) as c:
                for _ in range(100_000):
                    if stop.is_set():
                        return
                    before = not signalled.is_set()
                    try:
                        r = _infer_json(c, port, "scale", x)
                    except httpx.TransportError as error:
                        if before:
                            with lock:
                                bad.append(f"reset although sent before SIGTERM: {error!r}")
                        return  # later: refused or closed once shutdown began, never accepted
                    with lock:
                        if r.status_code == 200 and r.json()["outputs"][0]["data"] == (x * 2).ravel().tolist():
                            ok[0] += 1
                        elif r.status_code == 503 and r.headers.get("connection") == "close" and signalled.is_set():
                            return  # an explicit "shutting down"
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
                        if error.status() == "StatusCode.UNAVAILABLE" and signalled.is_set():
                            return  # refused once shutdown began: never accepted
                        with lock:
                            bad.append(f"grpc {error.status()} {error.message()}")
                        return
                    with lock:
                        if np.array_equal(y, x * 2):
                            ok[0] += 1
                        else:
                            bad.append(f"grpc {y}")

        def slow_upload() -> None:
            with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
                head = f"POST /v2/models/scale/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {10**6}\r\n\r\n{{"
                sock.sendall(head.encode())
                uploading.set()
                with contextlib.suppress(OSError):
                    for _ in range(100_000):  # a byte at a time, never the whole body
                        if stop.wait(0.1):
                            return
                        sock.sendall(b" ")

        uploading = threading.Event()
        threads = [threading.Thread(target=client) for _ in range(8)]
        threads += [threading.Thread(target=grpc_client) for _ in range(4)]
        threads.append(threading.Thread(target=slow_upload))
        try:
            with grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}") as g:
                assert g.is_server_ready()
                inp = grpcclient.InferInput("x", [2, 4], "FP32")
                inp.set_data_from_numpy(x)
                np.testing.assert_allclose(g.infer("scale", [inp]).as_numpy("y"), x * 2)
            for t in threads:
                t.start()
            assert uploading.wait(WAIT)
            deadline = time.monotonic() + WAIT
            while ok[0] < 200 and time.monotonic() < deadline:
                time.sleep(0.01)
            signalled.set()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(grace + WAIT / 4) == 0  # bounded by the grace period, not by the upload
            stop.set()
            for t in threads:
                t.join(WAIT)
            assert proc.stderr is not None
            tail = proc.stderr.read()
        finally:
            stop.set()
            _reap(proc)
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
            _reap(proc)

    def test_a_model_call_that_never_returns_ends_in_exit_0(self, tmp_path: Path) -> None:
        """A request whose model call never returns (a loop count the client chose) was cut off at the
        grace period, then the interpreter finalized under the call still in ONNX Runtime: the process
        aborted ("terminate called without an active exception", exit -6 and a core dump), not exit 0."""
        proc, port, _ = _start_cli(str(_spinning(tmp_path / "spin.onnx")), "--grace", "0.2")
        body = {
            "inputs": [
                {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1.0, 2.0, 3.0, 4.0]},
                {"name": "n", "shape": [1, 1], "datatype": "INT64", "data": [2**62]},
            ]
        }
        answers: list[object] = []

        def ask() -> None:
            try:
                answers.append(httpx.post(f"http://127.0.0.1:{port}/v2/models/spin/infer", json=body, timeout=WAIT))
            except httpx.HTTPError as error:  # cut off by the shutdown
                answers.append(error)

        client = threading.Thread(target=ask)
        try:
            with httpx.Client(timeout=WAIT) as c:
                client.start()
                deadline = time.monotonic() + WAIT  # until the model call runs (not while it is queued)
                while True:
                    (stats,) = c.get(f"http://127.0.0.1:{port}/v2/status").json()["models"][0]["predictors"]
                    if stats["accepted"] == 1 and stats["queue_depth"] == 0:
                        break
                    assert time.monotonic() < deadline, "the request never reached the model"
                    time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(WAIT) == 0
            assert proc.stderr is not None
            assert "failed=1" in proc.stderr.read()  # the cut-off request
            client.join(WAIT)
            assert len(answers) == 1
        finally:
            _reap(proc)

    @pytest.mark.parametrize(
        ("args", "message"),
        [
            (["none.onnx"], "inferkit serve: no model file"),
            (["scale.onnx", "--host", "a..b"], "inferkit serve: cannot resolve host 'a..b': encoding with 'idna'"),
            (["scale.onnx", "--grpc-listeners", "0"], "--grpc-listeners: must be from 1 to 64, got 0"),
            # descriptors ran out, with garbled gRPC C-core log lines before the exit
            (["scale.onnx", "--grpc-listeners", "100000"], "--grpc-listeners: must be from 1 to 64, got 100000"),
            # an OverflowError traceback from bind
            (["scale.onnx", "--port", "70000"], "--port: must be a port number from 0 to 65535, got 70000"),
            (["scale.onnx", "--port", "-5"], "--port: must be a port number from 0 to 65535, got -5"),
            # served gRPC on 4464, wrapped, or turned gRPC off without a word
            *(
                (
                    ["scale.onnx", "--grpc-port", port],
                    f"--grpc-port: must be a port number from 0 to 65535, or -1 to serve REST only, got {port}",
                )
                for port in ("70000", "65536", "-2")
            ),
            # a ValueError or OverflowError traceback at the shutdown; -1 was taken
            *(
                (["scale.onnx", "--grace", grace], f"--grace: must be a number from 0 to 86400 (a day), got {shown}")
                for grace, shown in [("nan", "nan"), ("inf", "inf"), ("-1", "-1.0"), ("1e300", "1e+300"), ("x", "'x'")]
            ),
            (["scale.onnx", "--eject-after", "0"], "--eject-after: must be >= 1, got 0"),
            (["scale.onnx", "--intra-op-threads", "-3"], "intra_op_threads must be an int >= 0"),
            # 300 replicas were built (a config file or a load stops at 256); 0 was a ValueError traceback
            *(
                (["scale.onnx", flag, count], f"{flag}: must be a count from 1 to 256, got {count}")
                for flag in ("--replicas", "--max-replicas", "--min-replicas")
                for count in ("0", "300")
            ),
            (["scale.onnx", "--max-ejected-fraction", "2"], "--max-ejected-fraction: must be in (0, 1], got 2"),
            (["scale.onnx", "--header-timeout-s", "0"], "--header-timeout-s: must be a finite number > 0, got 0"),
            (["scale.onnx", "--max-header-bytes", "10"], "max_header_bytes must be an int >= 1024, got 10"),
            (["scale.onnx", "--grpc-idle-s", "1e300"], "grpc_idle_s must be at most 2147483"),
            (
                ["scale.onnx", "--grpc-max-concurrent-streams", "99999999999"],
                "grpc_max_concurrent_streams must be an int <= 2147483647, got 99999999999",
            ),
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
        assert run.returncode == 2, run.stderr
        assert message in run.stderr
        assert "Traceback" not in run.stderr, run.stderr

    def test_an_admin_token_file_is_a_small_regular_file(self, tmp_path: Path) -> None:
        """``--admin-token-file`` of a FIFO blocked and of /dev/zero ran out of memory: exit 2, one line."""
        _model(tmp_path / "scale.onnx")
        os.mkfifo(tmp_path / "fifo")
        (tmp_path / "big").write_text("t" * (64 * 2**10 + 1))
        for token, message in [
            (tmp_path / "fifo", "fifo is not a regular file"),
            (Path("/dev/zero"), "/dev/zero is not a regular file"),
            (tmp_path / "big", f"big is larger than {64 * 2**10} bytes"),
        ]:
            serve = [sys.executable, "-m", "inferkit.cli", "serve", str(tmp_path / "scale.onnx"), "--port", "0"]
            run = subprocess.run(
                [*serve, "--grpc-port", "0", "--admin-token-file", str(token)],
                capture_output=True,
                text=True,
                timeout=WAIT,
                check=False,
            )
            assert (run.returncode, run.stderr.count("\n")) == (2, 1), run.stderr
            assert run.stderr.startswith("inferkit serve: "), run.stderr
            assert message in run.stderr, run.stderr

    @pytest.mark.parametrize("face", ["--port", "--grpc-port"])
    def test_a_port_in_use_is_one_line_and_exit_2(self, tmp_path: Path, face: str) -> None:
        """REST's port in use ended in exit 3, uvicorn's log and a dozen tracebacks from gRPC listeners
        started and never stopped; either face's port in use is now one line naming it."""
        _model(tmp_path / "scale.onnx")
        with socket.socket() as held:
            held.bind(("127.0.0.1", 0))
            held.listen()
            port = held.getsockname()[1]
            other = "--grpc-port" if face == "--port" else "--port"
            run = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "inferkit.cli",
                    "serve",
                    str(tmp_path / "scale.onnx"),
                    face,
                    str(port),
                    other,
                    "0",
                ],
                capture_output=True,
                text=True,
                timeout=WAIT,
                check=False,
            )
        kind = "REST" if face == "--port" else "gRPC"
        assert (run.returncode, run.stderr.splitlines()[0]) == (
            2,
            f"inferkit serve: cannot serve {kind} on 127.0.0.1:{port}: "
            + (
                "Address already in use"
                if kind == "REST"
                else f"Failed to bind to address 127.0.0.1:{port}: [Errno 98] Address already in use"
            ),
        ), run.stderr
        assert "Traceback" not in run.stderr, run.stderr


def test_the_announced_urls_bracket_an_ipv6_host(capsys: pytest.CaptureFixture[str]) -> None:
    """``--host ::1`` printed http://::1:8000, which no browser or client takes."""
    from inferkit.cli.serve import _announce

    predictor = Predictor.from_callable(lambda x: x, name="m")
    try:
        server = InferenceServer(Repository({"m": predictor}), host="::1", port=8000, grpc_port=8001)
        _announce(server)
    finally:
        gc.unfreeze()  # _announce freezes the heap for a serving process; not for this test run
        predictor.close()
    assert capsys.readouterr().err == "inferkit: serving ['m'] on http://[::1]:8000, grpc [::1]:8001\n"


class TestEdges:
    """A server that cannot listen says so at once and leaves nothing listening; a grace period that runs out."""

    def test_start_raises_the_port_in_use_at_once_and_stops_grpc(self) -> None:
        """start() waited its whole timeout (30 s) and raised TimeoutError, its gRPC listener left open."""
        with socket.socket() as free:
            free.bind(("127.0.0.1", 0))
            grpc_port = free.getsockname()[1]
        predictor = Predictor.from_callable(lambda x: x, name="m")
        with socket.socket() as held:
            held.bind(("127.0.0.1", 0))
            held.listen()
            port = held.getsockname()[1]
            server = InferenceServer(Repository({"m": predictor}), port=port, grpc_port=grpc_port)
            with pytest.raises(OSError, match=f"cannot serve REST on 127.0.0.1:{port}: Address already in use"):
                server.start(timeout=WAIT)
        with socket.socket() as probe:  # the gRPC port is free again: its listener was stopped
            probe.bind(("127.0.0.1", grpc_port))
        assert predictor.state.value == "ready"  # the models are the caller's: still open
        predictor.close()

    def test_an_empty_host_is_every_ipv4_address(self) -> None:
        """``host=""`` bound 0.0.0.0 (as ``bind(("", port))`` does) before hosts were resolved once; then refused."""
        from inferkit.server.sockets import addresses

        assert addresses("") == ["0.0.0.0"]

    @pytest.mark.parametrize("host", ["a..b", "x" * 64 + ".test", "\udc80"])
    def test_a_host_the_idna_codec_refuses_cannot_be_resolved(self, host: str) -> None:
        """An empty label, one past 63 characters, a lone surrogate: a UnicodeError traceback, now
        the same OSError as a name the resolver does not know."""
        from inferkit.server.sockets import addresses

        with pytest.raises(OSError, match=r"cannot resolve host '.*': encoding with 'idna' codec failed"):
            addresses(host)

    def test_both_faces_listen_on_the_same_addresses_of_a_name(self) -> None:
        """``--host localhost``: grpc resolved the name itself (127.0.0.1 and ::1), uvicorn bound
        127.0.0.1 only; whatever the name resolves to here, both faces now listen on the same."""
        predictor = Predictor.from_callable(lambda x: x, name="m")
        server = InferenceServer(Repository({"m": predictor}), host="localhost", port=0, grpc_port=0).start(WAIT)
        try:
            reached = {}
            for address in ("127.0.0.1", "::1"):
                for face, port in (("rest", server.port), ("grpc", server.grpc_port)):
                    with contextlib.suppress(OSError), socket.create_connection((address, port), timeout=WAIT):
                        reached[address, face] = True
            assert reached.get(("127.0.0.1", "rest")) == reached.get(("127.0.0.1", "grpc"))
            assert reached.get(("::1", "rest")) == reached.get(("::1", "grpc"))
            assert reached, "localhost reached neither face"
        finally:
            server.stop()
            predictor.close()

    @pytest.mark.parametrize("face", ["rest", "grpc"])
    def test_a_port_taken_on_one_address_of_the_host_is_refused(
        self, monkeypatch: pytest.MonkeyPatch, face: str
    ) -> None:
        """A host naming two addresses is served on both; a port another process holds on one of them
        is refused, naming that address (grpc bound the other one, warned, and served)."""
        real = socket.getaddrinfo

        def resolve(host: Any, *args: Any, **kwargs: Any) -> Any:
            if host == "dual.test":  # as localhost resolves on many machines
                return real("127.0.0.1", *args, **kwargs) + real("::1", *args, **kwargs)
            return real(host, *args, **kwargs)

        monkeypatch.setattr(socket, "getaddrinfo", resolve)
        predictor = Predictor.from_callable(lambda x: x, name="m")
        try:
            server = InferenceServer(Repository({"m": predictor}), host="dual.test", port=0, grpc_port=0).start(WAIT)
            try:
                for address in ("127.0.0.1", "::1"):
                    for port in (server.port, server.grpc_port):
                        socket.create_connection((address, port), timeout=WAIT).close()
            finally:
                server.stop()
            with socket.socket(socket.AF_INET6) as held:
                held.bind(("::1", 0))
                held.listen()
                port = held.getsockname()[1]
                ports = {"port": port, "grpc_port": 0} if face == "rest" else {"port": 0, "grpc_port": port}
                server = InferenceServer(Repository({"m": predictor}), host="dual.test", **ports)
                kind = "REST on" if face == "rest" else "gRPC on dual.test:{0}: Failed to bind to address"
                with pytest.raises(OSError, match=re.escape(f"cannot serve {kind.format(port)} [::1]:{port}")):
                    server.start(timeout=WAIT)
        finally:
            predictor.close()

    @pytest.mark.parametrize(
        ("option", "value", "message"),
        [
            ("grace", 1e300, "grace must be a number from 0 to 86400"),  # a crash at shutdown (a join overflowed)
            ("grace", float("nan"), "grace must be a number"),
            ("grpc_listeners", 100_000, "listeners must be an int from 1 to 64"),  # out of file descriptors
        ],
    )
    def test_the_library_bounds_what_the_command_bounds(self, option: str, value: object, message: str) -> None:
        """The command refused these; InferenceServer (and create_server) took them."""
        predictor = Predictor.from_callable(lambda x: x, name="m")
        try:
            with pytest.raises(ValueError, match=message):
                InferenceServer(Repository({"m": predictor}), port=0, grpc_port=0, **{option: value}).start(WAIT)
        finally:
            predictor.close()

    def test_building_a_server_leaves_the_hosts_logging_alone(self, tmp_path: Path) -> None:
        """uvicorn's default log config went through dictConfig: building a server (not even started)
        closed the host's file handler (its later records lost) and replaced uvicorn's loggers'."""
        root = logging.getLogger()
        handler = logging.FileHandler(tmp_path / "host.log")
        parent = logging.getLogger("uvicorn")
        was = (parent.handlers[:], parent.propagate, parent.level)
        root.addHandler(handler)
        try:
            predictor = Predictor.from_callable(lambda x: x, name="m")
            server = InferenceServer(Repository({"m": predictor}), port=0, grpc_port=None)
            logging.getLogger("host").warning("after InferenceServer()")
            server.start(WAIT).join(WAIT)
            logging.getLogger("host").warning("after join()")
        finally:
            root.removeHandler(handler)
            handler.close()
        assert (parent.handlers, parent.propagate, parent.level) == was
        text = (tmp_path / "host.log").read_text()
        assert "after InferenceServer()" in text
        assert "after join()" in text

    def test_a_server_serves_once_and_a_stop_is_never_lost(self) -> None:
        """stop() before the server's loop began was dropped (it served on); join() or stop() after the
        end raised "Event loop is closed"; start() again returned at once with nothing serving."""
        predictor = Predictor.from_callable(lambda x: x, name="m")
        server = InferenceServer(Repository({"m": predictor}), port=0, grpc_port=None)
        server.stop()
        server.start(WAIT)
        thread = server._lifecycle.thread
        assert thread is not None
        thread.join(WAIT)
        assert not thread.is_alive()  # stopped as soon as it started
        assert predictor.state.value == "closed"
        server.stop()
        server.join(WAIT)
        with pytest.raises(RuntimeError, match="already been started"):
            server.start(WAIT)
        with pytest.raises(RuntimeError, match="already run"):
            asyncio.run(server.run())

    def test_run_with_signals_on_the_hosts_loop_gives_its_loop_handler_back(self) -> None:
        """A handler the host added to its own loop (``add_signal_handler``) was removed for good: after
        run(handle_signals=True) SIGTERM reached nobody and the process ignored it."""
        got: list[str] = []
        before = signal.getsignal(signal.SIGTERM)

        async def main() -> None:
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGTERM, got.append, "host")
            try:
                predictor = Predictor.from_callable(lambda x: x, name="m")
                server = InferenceServer(Repository({"m": predictor}), port=0, grpc_port=None)
                await server.run(handle_signals=True, on_start=lambda s: os.kill(os.getpid(), signal.SIGTERM))
                assert got == []  # the server's, while it served
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(100):
                    if got:
                        break
                    await asyncio.sleep(0.01)
                assert got == ["host"]
                other = InferenceServer(Repository({"m": Predictor.from_callable(lambda x: x)}), port=0, grpc_port=None)
                busy = asyncio.create_task(other.run(handle_signals=True))
                while not other.started.is_set():  # noqa: ASYNC110 (a threading.Event: set on this loop)
                    await asyncio.sleep(0.01)
                third = InferenceServer(Repository({"m": Predictor.from_callable(lambda x: x)}), port=0, grpc_port=None)
                with pytest.raises(RuntimeError, match="another InferenceServer handles this loop"):
                    await third.run(handle_signals=True)
                third.repository.close()
                other.stop()
                await busy
            finally:
                loop.remove_signal_handler(signal.SIGTERM)

        try:
            asyncio.run(main())
        finally:
            signal.signal(signal.SIGTERM, before)

    def test_handle_signals_off_the_main_thread_is_refused_before_anything(self) -> None:
        """asyncio's ValueError came after the server was marked as run: it could not serve again."""
        predictor = Predictor.from_callable(lambda x: x, name="m")
        server = InferenceServer(Repository({"m": predictor}), port=0, grpc_port=None)
        errors: list[BaseException] = []

        def off_main() -> None:
            try:
                asyncio.run(server.run(handle_signals=True))
            except RuntimeError as error:
                errors.append(error)

        thread = threading.Thread(target=off_main)
        thread.start()
        thread.join(WAIT)
        assert "needs the main thread" in str(errors[0])
        server.start(WAIT).join(WAIT)  # still unused: it serves
        assert predictor.state.value == "closed"

    def test_run_with_signals_gives_the_host_its_handlers_back(self) -> None:
        """run(handle_signals=True) left its loop's handlers installed: once it returned, Ctrl-C did
        nothing and SIGTERM no longer reached the host's own handler."""
        got: list[int] = []

        def host(signum: int, frame: object) -> None:
            got.append(signum)

        before_int = signal.getsignal(signal.SIGINT)
        before_term = signal.signal(signal.SIGTERM, host)
        try:
            predictor = Predictor.from_callable(lambda x: x, name="m")
            server = InferenceServer(Repository({"m": predictor}), port=0, grpc_port=None)
            asyncio.run(server.run(handle_signals=True, on_start=lambda s: os.kill(os.getpid(), signal.SIGTERM)))
            assert predictor.state.value == "closed"  # SIGTERM stopped it
            assert signal.getsignal(signal.SIGINT) is before_int
            assert signal.getsignal(signal.SIGTERM) is host
            os.kill(os.getpid(), signal.SIGTERM)
            assert got == [signal.SIGTERM]
        finally:
            signal.signal(signal.SIGTERM, before_term)

    def test_requests_cut_at_the_grace_log_one_warning_not_a_traceback_each(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """uvicorn logged "Exception in ASGI application" and a CancelledError traceback for each."""
        release = threading.Event()

        def stuck(x: np.ndarray) -> np.ndarray:
            release.wait(WAIT)
            return x

        spec = [TensorSpec("x", np.float32, (None, 4))]
        predictor = Predictor.from_callable(stuck, inputs=spec, outputs=[TensorSpec("y", np.float32, (None, 4))])
        server = InferenceServer(Repository({"m": predictor}), port=0, grpc_port=None, grace=0.3).start(WAIT)
        errors: list[str] = []

        def call() -> None:
            with httpx.Client(timeout=WAIT) as client:
                try:
                    _infer_json(client, server.port, "m", np.ones((1, 4), np.float32))
                except httpx.HTTPError as error:
                    errors.append(type(error).__name__)

        callers = [threading.Thread(target=call) for _ in range(2)]
        uvicorn_log = logging.getLogger(
            "uvicorn.error"
        )  # in case a uvicorn run with its own config stopped it propagating
        uvicorn_log.addHandler(caplog.handler)
        with caplog.at_level("WARNING"):
            for caller in callers:
                caller.start()
            deadline = time.monotonic() + WAIT
            while predictor.stats().accepted < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.1)
            server.join(WAIT)
            release.set()
            for caller in callers:
                caller.join(WAIT)
        uvicorn_log.removeHandler(caplog.handler)
        assert errors == ["RemoteProtocolError"] * 2
        assert [r.getMessage() for r in caplog.records if r.levelname in {"WARNING", "ERROR"}] == [
            "the grace period of 0.3 s is over: cutting off 2 HTTP requests still running"
        ]

    def test_models_busy_at_the_shutdown_share_the_grace_period(self) -> None:
        """Each model still running work when the faces had drained (in-process callers here; a call whose
        client left is the same) was closed with the whole grace period, one after another: four busy
        models held the shutdown four grace periods. Now one deadline covers them all."""
        release = threading.Event()

        def stuck(x: np.ndarray) -> np.ndarray:
            release.wait(WAIT)
            return x

        spec, out = [TensorSpec("x", np.float32, (None, 4))], [TensorSpec("y", np.float32, (None, 4))]
        predictors = {n: Predictor.from_callable(stuck, inputs=spec, outputs=out, name=n) for n in "abcd"}
        grace = 1.0
        server = InferenceServer(Repository(predictors), port=0, grpc_port=None, grace=grace).start(WAIT)
        try:
            futures = [p.submit(np.ones((1, 4), np.float32)) for p in predictors.values()]
            deadline = time.monotonic() + WAIT
            while any(p.stats().in_flight < 1 for p in predictors.values()) and time.monotonic() < deadline:
                time.sleep(0.01)
            began = time.monotonic()
            server.join(WAIT)
            took = time.monotonic() - began
        finally:
            release.set()
        assert took < 2 * grace, took  # four grace periods before
        assert [p.state.value for p in predictors.values()] == ["closed"] * 4
        for future in futures:
            with pytest.raises(Closed):
                future.result(WAIT)

    def test_ctrl_c_while_a_model_drains_is_raised_at_once(self) -> None:
        """``Repository.close(None)`` caught a ``KeyboardInterrupt`` as a model's failure to close and went on to
        drain every later model first (one Ctrl-C a model; with a hung model, never raised). Now it is raised at
        once, the later models closed without waiting: their running calls end ``Closed``."""
        release = threading.Event()
        returned: list[str] = []

        def stuck(name: str) -> Callable[[np.ndarray], np.ndarray]:
            def model(x: np.ndarray) -> np.ndarray:
                release.wait(WAIT)
                returned.append(name)
                return x

            return model

        spec, out = [TensorSpec("x", np.float32, (None, 4))], [TensorSpec("y", np.float32, (None, 4))]
        predictors = {n: Predictor.from_callable(stuck(n), inputs=spec, outputs=out, name=n) for n in "ab"}
        futures = [p.submit(np.ones((1, 4), np.float32)) for p in predictors.values()]
        deadline = time.monotonic() + WAIT
        while any(p.stats().in_flight < 1 for p in predictors.values()) and time.monotonic() < deadline:
            time.sleep(0.01)
        interrupt = threading.Timer(0.3, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT))
        interrupt.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                Repository(predictors).close(None)
            assert returned == []  # raised while both calls still ran (before: after b's had returned)
            assert predictors["b"].state.value == "closed"
            with pytest.raises(Closed):
                futures[1].result(WAIT)
        finally:
            interrupt.cancel()
            release.set()
            for p in predictors.values():
                p.close(WAIT)


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


class _Stuck:
    """Executor jobs that block until released: work a shutdown can never wait out."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.started = threading.Semaphore(0)

    def job(self) -> None:
        self.started.release()
        self.gate.wait(WAIT * 4)


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

    @pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
    def test_run_loop_returns_while_its_executor_still_works(self, loop: str) -> None:
        """asyncio.Runner joined the default executor's threads when the loop closed (no timeout on 3.11):
        a job that never ended kept run_loop, and so the process, from ever returning."""
        if loop == "uvloop":
            pytest.importorskip("uvloop", reason="uvloop is not built for this platform")
        stuck = _Stuck()

        async def main() -> str:
            asyncio.get_running_loop().run_in_executor(None, stuck.job)
            await asyncio.to_thread(stuck.started.acquire)  # the stuck job runs
            return "done"

        returned: list[str] = []
        runner = threading.Thread(target=lambda: returned.append(run_loop(main(), loop)), daemon=True)
        runner.start()
        try:
            runner.join(WAIT)
            assert returned == ["done"]
        finally:
            stuck.gate.set()
            runner.join(WAIT)

    def test_models_close_while_every_executor_thread_is_stuck(self) -> None:
        """The shutdown closed the models on the loop's default executor, behind whatever work filled it
        (large decodes of requests cut off): the models were never closed and run() never returned."""
        predictor = Predictor.from_callable(lambda x: x, inputs=[TensorSpec("x", np.float32, (None, 4))], name="m")
        server = InferenceServer(Repository({"m": predictor}), port=0, grpc_port=None, grace=0.2)
        stuck = _Stuck()

        def fill(_: InferenceServer) -> None:
            loop = asyncio.get_running_loop()
            for _ in range(64):  # more than any default executor's threads
                loop.run_in_executor(None, stuck.job)

        runner = threading.Thread(target=run_loop, args=(server.run(on_start=fill),), daemon=True)
        runner.start()
        try:
            assert server.started.wait(WAIT)
            assert stuck.started.acquire(timeout=WAIT)  # the executor's threads are stuck
            server.stop()
            runner.join(WAIT)
            assert not runner.is_alive()
            assert predictor.state.value == "closed"
        finally:
            stuck.gate.set()
            runner.join(WAIT)
            predictor.close(WAIT)

    def test_an_unknown_loop_is_refused(self) -> None:
        """A loop name outside LOOPS fails at construction, naming the choices."""
        predictor = Predictor.from_callable(lambda x: x, inputs=[TensorSpec("x", np.float32, (None, 4))])
        try:
            with pytest.raises(ValueError, match="loop must be one of"):
                InferenceServer(Repository({"m": predictor}), loop="trio")
        finally:
            predictor.close(WAIT)


def _echo_server(**limits: Any) -> InferenceServer:
    predictor = Predictor.from_callable(lambda x: x * 2, inputs=[TensorSpec("x", np.float32, (None, 4))])
    return InferenceServer(
        Repository({"m": predictor}), port=0, grpc_port=None, grace=WAIT, limits=ConnectionLimits(**limits)
    ).start()


def _read_response(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    sock.settimeout(WAIT)
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def _live(port: int) -> int:
    with httpx.Client(timeout=WAIT) as c:
        return c.get(f"http://127.0.0.1:{port}/v2/health/live").status_code


class TestConnectionLimits:
    """What one HTTP client may hold: no client can lock the others out."""

    def test_a_head_that_never_finishes_gets_408(self) -> None:
        """A connection that sends part of its head and stops (slowloris) is answered 408 and
        closed after header_timeout_s, while other clients are answered meanwhile."""
        server = _echo_server(header_timeout_s=0.5)
        try:
            with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT) as sock:
                sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                assert _live(server.port) == 200
                answer = _read_response(sock)
            assert answer.startswith(b"HTTP/1.1 408 "), answer
            assert b"header_timeout_s" in answer
        finally:
            server.join(WAIT)

    @pytest.mark.parametrize("chunk", [1024, 2**20])
    def test_a_huge_head_gets_431(self, chunk: int) -> None:
        """A head past max_header_bytes is answered 431 (in small pieces or in one), not buffered."""
        server = _echo_server(max_header_bytes=16 * 1024)
        try:
            with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT) as sock:
                sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: ")
                with contextlib.suppress(OSError):  # the server stops reading: sending may fail
                    for _ in range(50 * 2**20 // chunk):  # up to 50 MB
                        sock.sendall(b"a" * chunk)
                        if chunk == 2**20:
                            sock.sendall(b"\r\n\r\n")
                            break
                answer = _read_response(sock)
            assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
            assert b"max_header_bytes=16384" in answer
            assert _live(server.port) == 200
        finally:
            server.join(WAIT)

    def test_a_head_just_over_the_limit_in_two_reads_gets_431(self) -> None:
        """The read a head begins in is not counted as it arrives (it may end pipelined requests), but once
        the head is complete it is sized exactly: 15 KB then 2 KB of one head, limit 16 KiB, is a 431."""
        server = _echo_server(max_header_bytes=16 * 1024)
        try:
            with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT) as sock:
                sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 15_000)
                time.sleep(0.2)  # read apart
                sock.sendall(b"a" * 2_000 + b"\r\n\r\n")
                answer = _read_response(sock)
            assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
        finally:
            server.join(WAIT)

    def test_pipelined_requests_whose_chunk_ends_in_a_head_are_all_answered(self) -> None:
        """300 small requests sent back to back (46 KB, more than max_header_bytes in all) with the last
        one's head cut in two: every one is answered 200. Before, the whole chunk counted as the cut head:
        431, the answers of those already run lost."""
        server = _echo_server(max_header_bytes=16 * 1024)
        body = b'{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":[1,2,3,4]}]}'
        post = b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        try:
            with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT) as sock:
                sock.sendall(post * 300 + post[:40])
                time.sleep(0.2)  # the server reads what came so far: its last chunk ends inside a head
                sock.sendall(post[40:].replace(b"x\r\n", b"x\r\nConnection: close\r\n", 1))  # then it closes
                answer = _read_response(sock)
            assert answer.count(b"HTTP/1.1 200 ") == 301, answer[-300:]
            assert b" 431 " not in answer
        finally:
            server.join(WAIT)

    def test_a_stalled_body_gets_408(self) -> None:
        """A request whose body stops arriving is answered 408 after body_timeout_s."""
        server = _echo_server(body_timeout_s=0.5)
        try:
            with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT) as sock:
                sock.sendall(b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
                answer = _read_response(sock)
            assert answer.startswith(b"HTTP/1.1 408 "), answer
            assert b"body_timeout_s" in answer
        finally:
            server.join(WAIT)

    def test_idle_connections_make_room_for_a_new_client(self) -> None:
        """Past max_connections, the oldest idle connections are closed so a new client gets in."""
        server = _echo_server(max_connections=4)
        idle = [socket.create_connection(("127.0.0.1", server.port), timeout=WAIT) for _ in range(8)]
        try:
            x = np.ones((1, 4), np.float32)
            with httpx.Client(timeout=WAIT) as c:
                for _ in range(3):
                    assert _infer_json(c, server.port, "m", x).status_code == 200
            assert _read_response(idle[0]) == b""  # the oldest was closed to make room
        finally:
            for sock in idle:
                sock.close()
            server.join(WAIT)

    def test_limits_are_validated(self) -> None:
        """A bad limit fails at construction and names the field."""
        with pytest.raises(ValueError, match="max_header_bytes must be an int >= 1024, got 10"):
            ConnectionLimits(max_header_bytes=10)
        with pytest.raises(ValueError, match="header_timeout_s must be a finite number > 0"):
            ConnectionLimits(header_timeout_s=0)
        with pytest.raises(ValueError, match="max_message_bytes must be an int <= 2147483647"):
            ConnectionLimits(max_message_bytes=2**31)

    @pytest.mark.parametrize(
        ("field", "value", "message"),
        [  # each became a gRPC option, a C int: OverflowError when the server started
            ("grpc_idle_s", 2592000, r"grpc_idle_s must be at most 2147483 \(2\*\*31 - 1 milliseconds\), got 2592000"),
            ("grpc_idle_s", 1e300, r"grpc_idle_s must be at most 2147483"),
            ("grpc_max_concurrent_streams", 2**31, r"grpc_max_concurrent_streams must be an int <= 2147483647"),
            ("max_header_bytes", 2**31, r"max_header_bytes must be an int <= 2147483647"),
        ],
    )
    def test_grpc_limits_fit_a_c_int(self, field: str, value: float, message: str) -> None:
        """The limits that become gRPC options are refused past 2**31 - 1 (milliseconds for grpc_idle_s)."""
        with pytest.raises(ValueError, match=message):
            ConnectionLimits(**{field: value})
        assert ConnectionLimits(grpc_idle_s=2147483, grpc_max_concurrent_streams=2**31 - 1).grpc_idle_s == 2147483

    def test_body_limits_reach_the_rest_face(self) -> None:
        """max_request_bytes and max_json_bytes set on the server answer 413 naming them; binary still fits."""
        server = _echo_server(max_json_bytes=1024, max_request_bytes=4096)
        try:
            url = f"http://127.0.0.1:{server.port}/v2/models/m/infer"
            rows = 64
            body = {"inputs": [{"name": "x", "shape": [rows, 4], "datatype": "FP32", "data": [1.5] * (rows * 4)}]}
            with httpx.Client(timeout=WAIT) as client:
                too_much_json = client.post(url, json=body)
                assert too_much_json.status_code == 413
                assert "max_json_bytes=1024" in too_much_json.json()["error"]
                too_big = client.post(url, content=b"x" * 5000)
                assert too_big.status_code == 413
                assert "max_request_bytes=4096" in too_big.json()["error"]
                raw = np.full((rows, 4), 1.5, np.float32).tobytes()
                tensor = {
                    "name": "x",
                    "shape": [rows, 4],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)},
                }
                head = json.dumps({"inputs": [tensor]}).encode()
                ok = client.post(url, content=head + raw, headers={"Inference-Header-Content-Length": str(len(head))})
                assert ok.status_code == 200, ok.text
        finally:
            server.join(WAIT)


class TestOpenFiles:
    """The open-file limit."""

    def test_raise_open_file_limit_reaches_the_hard_limit(self) -> None:
        """The soft limit is raised to the hard one, and the connection default stays below it."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
            now = raise_open_file_limit()
            assert now == (hard if hard != resource.RLIM_INFINITY else now)
            assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == now
            assert default_max_connections(256) == 128
            assert default_max_connections(10**7) == 10_000
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    def test_many_idle_connections_at_a_low_limit_lock_no_one_out(self, tmp_path: Path) -> None:
        """At a hard open-file limit of 256, one client holding 400 idle connections does not
        keep another client from being answered."""

        def low_limit() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

        proc, port, _ = _start_cli(str(_model(tmp_path / "scale.onnx")), preexec_fn=low_limit)
        idle: list[socket.socket] = []
        try:
            for _ in range(400):
                with contextlib.suppress(OSError):
                    idle.append(socket.create_connection(("127.0.0.1", port), timeout=WAIT))
            x = np.ones((1, 4), np.float32)
            with httpx.Client(timeout=WAIT) as c:
                for _ in range(5):
                    assert _infer_json(c, port, "scale", x).status_code == 200
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(WAIT) == 0
            assert proc.stderr is not None
            assert "Too many open files" not in proc.stderr.read()
        finally:
            for sock in idle:
                sock.close()
            _reap(proc)


class TestGrpcConnections:
    """``grpc_max_connections`` bounds the gRPC face's connections, as ``max_connections`` the HTTP face's."""

    def test_past_the_bound_a_new_connection_is_refused_until_one_closes(self) -> None:
        """Nothing bounded gRPC connections (each may hold streams x message bytes). With a bound of 2, a third
        client is UNAVAILABLE while two are connected, and gets in once one has left."""
        predictor = Predictor.from_callable(lambda x: x * 2, inputs=[TensorSpec("x", np.float32, (None, 4))])
        limits = ConnectionLimits(grpc_max_connections=2)
        server = InferenceServer(
            Repository({"m": predictor}), port=0, grpc_port=0, grace=WAIT, limits=limits, grpc_listeners=1
        ).start()
        own = [("grpc.use_local_subchannel_pool", 1)]  # a connection of its own for each client
        clients = [grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}", channel_args=own) for _ in "abc"]
        try:
            assert clients[0].is_server_live()
            assert clients[1].is_server_live()
            with pytest.raises(InferenceServerException, match="UNAVAILABLE"):
                clients[2].is_server_live(client_timeout=WAIT)
            clients[0].close()
            deadline = time.monotonic() + WAIT
            while time.monotonic() < deadline:  # the server sees the close, then the client retries
                with contextlib.suppress(InferenceServerException):
                    if clients[2].is_server_live(client_timeout=1):
                        break
                time.sleep(0.05)
            assert clients[2].is_server_live(client_timeout=WAIT)
        finally:
            for client in clients[1:]:
                client.close()
            server.join(WAIT)

    def test_the_default_is_a_quarter_of_the_open_file_limit(self) -> None:
        """HTTP's default is half the open-file limit; gRPC's a quarter, what is left the models' and the process's."""
        assert default_max_connections(256, 4) == 64
        assert default_max_connections(10**7, 4) == 10_000
        with pytest.raises(ValueError, match="grpc_max_connections must be an int <= 2147483647"):
            ConnectionLimits(grpc_max_connections=2**31)


class TestQueueBytesFlag:
    """``inferkit serve --max-queue-bytes`` reaches the model's queue."""

    def test_a_request_past_the_bound_is_400_naming_it(self, tmp_path: Path) -> None:
        """One row of float32 [N, 4] is 16 bytes: with a bound of 16, one row runs and two are refused."""
        proc, port, _ = _start_cli(str(_model(tmp_path / "scale.onnx")), "--max-queue-bytes", "16")
        try:
            with httpx.Client(timeout=WAIT) as client:
                assert _infer_json(client, port, "scale", np.ones((1, 4), np.float32)).status_code == 200
                refused = _infer_json(client, port, "scale", np.ones((2, 4), np.float32))
                assert refused.status_code == 400
                assert "32 bytes of inputs, more than max_queue_bytes=16" in refused.json()["error"]
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=WAIT)
        assert proc.returncode == 0, err


class TestTraceFlag:
    """``inferkit serve --trace console`` exports spans that continue the client's trace."""

    def test_console_spans_carry_the_callers_trace(self, tmp_path: Path) -> None:
        """A request with a W3C traceparent: the exported request span has its trace id and parent."""
        pytest.importorskip("opentelemetry.sdk")
        proc, port, _ = _start_cli(str(_model(tmp_path / "scale.onnx")), "--trace", "console")
        trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
        try:
            with httpx.Client(timeout=WAIT) as client:
                x = np.ones((1, 4), np.float32)
                response = _infer_json(client, port, "scale", x, traceparent=f"00-{trace_id}-{parent}-01")
                assert response.status_code == 200, response.text
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=WAIT)
        assert proc.returncode == 0, err
        spans = [json.loads(block) for block in re.findall(r"^\{\n.*?^\}", err, re.DOTALL | re.MULTILINE)]
        requests = [s for s in spans if s["name"] == "inferkit.request"]
        assert requests, err[-2000:]
        assert requests[0]["context"]["trace_id"] == "0x" + trace_id
        assert requests[0]["parent_id"] == "0x" + parent
        assert {s["name"] for s in spans} >= {"inferkit.request", "inferkit.queue", "inferkit.batch"}

    def test_otlp_without_its_exporter_is_refused(self, tmp_path: Path) -> None:
        """--trace otlp without the OTLP exporter installed exits 2 and names what to install."""
        try:
            import opentelemetry.exporter.otlp.proto.http  # noqa: F401
        except ImportError:
            pass
        else:
            pytest.skip("the OTLP exporter is installed here")
        pytest.importorskip("opentelemetry.sdk")
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "inferkit.cli",
                "serve",
                str(_model(tmp_path / "m.onnx")),
                "--trace",
                "otlp",
                "--port",
                "0",
                "--grpc-port",
                "0",
            ],
            capture_output=True,
            text=True,
            timeout=WAIT,
            check=False,
        )
        assert done.returncode == 2
        assert "--trace otlp needs opentelemetry" in done.stderr
