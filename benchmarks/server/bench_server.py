"""Serving benchmark: inferkit against NVIDIA PyTriton and LitServe, over HTTP and gRPC, in one run.

What is measured
----------------
Every server serves the same model (``benchmarks/models.py``: ``mlp_bytes()``, float32 MLP
256 -> 1024 -> 1024 -> 10) with ONNX Runtime on the CPU, ``intra_op_num_threads`` set by
``--intra-op`` (default 1: inferkit's own default on a 2-core machine, one core left to the
server and clients) and ``inter_op_num_threads=1`` in all three, dynamic batching with at
most 64 rows and a 2 ms delay, bound to 127.0.0.1 on free ports:

``inferkit``  ``inferkit serve mlp.onnx --max-batch-size 64 --max-delay-ms 2`` (the project's
              venv; a TOML config instead when ``--intra-op`` differs from inferkit's default)
``PyTriton``  ``pytriton_server.py``: a real Triton server (dynamic batcher, max_batch_size 64,
              max_queue_delay 2 ms) whose ``@batch`` function runs the session (``.venv-pytriton``)
``LitServe``  ``litserve_server.py``: ``LitAPI(max_batch_size=64, batch_timeout=0.002)``, one
              worker (``.venv-litserve``); it speaks only its own JSON API, so only wrk runs

Each client keeps 32 requests in flight (closed loop: send, wait, send again), 1 row each; the
row is the same fixed random float32 row everywhere (as JSON, 256 numbers of ~18 digits each):

``wrk-HTTP``           ``wrk -t2 -c32 -d{seconds}s --latency -s post.lua``: a v2 JSON body
                       (``{"inputs": [{"name": "x", "shape": [1, 256], "datatype": "FP32",
                       "data": [...]}]}``) to ``/v2/models/mlp/infer``; for LitServe
                       ``{"input": [...]}`` to ``/predict``. p50/p99 are wrk's.
``tritonclient-HTTP``  ``tritonclient.http``, binary tensor data both ways, ``--client-procs``
                       processes x (32 / procs) threads, one client (connection) per thread
``gRPC``               ``tritonclient.grpc``, the same processes x threads, one channel per thread;
                       no deadline unless ``--grpc-deadline S`` (a deadline the server sees)

A server starts once the machine is idle (``--quiet-wait``), must answer ready within
``--startup-timeout`` and compute the right answer for one row (checked against ONNX Runtime
here), then each client runs ``--warmup`` seconds unmeasured and ``--seconds`` measured (wrk
takes whole seconds). tritonclient cells count the requests that *finish* inside the window;
their latencies, timed by the client with ``perf_counter``, give p50/p99. The server is then
stopped (SIGTERM, ``--stop-timeout``, then SIGTERM and SIGKILL to its process group).

``CPU cores: server / clients / other`` is the CPU time during the window, in cores (2.00 = both
cores here), of the server's whole process tree (its session), of the clients (wrk, or the
tritonclient processes), and of everything else on the machine. Client and server share the 2
cores, so every number includes the client's cost; the same clients run against every server,
so the comparison is fair, but absolute numbers are lower than with a separate client machine.
A warning follows the table when "other" is above 0.15 cores: someone else was using the CPU.

This machine is a VM on a shared host: identical runs differ by 10-25%. ``--rounds N``
repeats everything N times (each round starts with a different server) and reports each
cell's median round, with every round's req/s and p99 in the notes and inferkit's ratio round by
round (servers measured minutes apart, so the per-round ratios are the steadier figure).

``--inferkit-cmd CMD`` runs ``CMD serve ...`` instead of the venv's ``inferkit``, to measure a
candidate change side by side with the peers.

Setup (opt-in, never part of ``make test``): ``benchmarks/server/setup_peers.sh`` installs
``wrk`` and creates ``.venv-pytriton`` and ``.venv-litserve`` in the repository root; a missing
venv skips that peer with a note. Run ``.venv/bin/python benchmarks/server/bench_server.py``
(``--seconds 10`` by default; ``--servers inferkit,pytriton`` / ``--clients wrk,grpc`` for a
subset; ``--rounds 3`` for medians).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
MODEL = "mlp"
INPUT, OUTPUT, IN_DIM = "x", "y", 256
CONNECTIONS = 32
MAX_BATCH = 64
MAX_DELAY_MS = 2.0
HOST = "127.0.0.1"

SERVERS = {"inferkit": "inferkit", "pytriton": "PyTriton", "litserve": "LitServe"}
CLIENTS = {"wrk": "wrk-HTTP", "http": "tritonclient-HTTP", "grpc": "gRPC"}
VENVS = {"pytriton": ROOT / ".venv-pytriton", "litserve": ROOT / ".venv-litserve"}
TARGET_VS_PYTRITON = 1.3
TARGET_VS_LITSERVE = 3.0

QUIET_CORES = 0.3  # below this many busy cores the machine counts as idle before a server starts
OTHER_LOAD_WARNING = 0.15  # cores used by processes that are neither the server nor the clients
MAX_REQUESTS_PER_THREAD = 10_000_000  # a bound on each client loop besides its clock
CLIENT_IMPORT_S = 3.0  # head start for client processes to import tritonclient before warm-up ends


# --------------------------------------------------------------------------- results


@dataclass
class Cell:
    """One server x client measurement (or why there is none)."""

    rps: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    errors: int = 0
    server_cores: float | None = None
    client_cores: float | None = None
    other_cores: float | None = None
    note: str = ""
    rounds: list[float | None] = field(default_factory=list)
    """req/s of every round, in round order (None: that round failed)."""
    p99_rounds: list[float | None] = field(default_factory=list)
    """p99 ms of every round, in round order."""


def _median_cell(cells: list[Cell]) -> Cell:
    measured = sorted((c for c in cells if c.rps is not None), key=lambda c: c.rps or 0.0)
    if not measured:
        return cells[-1]
    mid = measured[(len(measured) - 1) // 2]
    mid.rounds = [c.rps for c in cells]
    mid.p99_rounds = [c.p99_ms for c in cells]
    mid.errors = max(c.errors for c in measured)
    return mid


def _round_ratios(mine: Cell, other: Cell) -> str:
    """inferkit's req/s over the peer's, round by round (the two ran minutes apart at most)."""
    pairs = [f"{a / b:.2f}" for a, b in zip(mine.rounds, other.rounds, strict=False) if a and b]
    return f" (rounds {', '.join(pairs)})" if len(pairs) > 1 else ""


# --------------------------------------------------------------------------- model and bodies


def _model_bytes() -> bytes:
    sys.path.insert(0, str(HERE.parent))
    from models import mlp_bytes

    return mlp_bytes()


def _row() -> Any:
    import numpy as np

    return np.random.default_rng(1).standard_normal((1, IN_DIM)).astype(np.float32)


def _v2_json(row: Any) -> bytes:
    data = [float(v) for v in row.ravel()]
    body = {"inputs": [{"name": INPUT, "shape": [1, IN_DIM], "datatype": "FP32", "data": data}]}
    return json.dumps(body).encode()


def _litserve_json(row: Any) -> bytes:
    return json.dumps({"input": [float(v) for v in row.ravel()]}).encode()


# --------------------------------------------------------------------------- processes


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 right now (held together, so no duplicates)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind((HOST, 0))
        return [s.getsockname()[1] for s in socks]


def _proc_stats() -> Iterator[tuple[int, list[str]]]:
    """(pid, the fields of /proc/pid/stat after the command name) for every process."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        yield int(entry.name), text.rsplit(")", 1)[1].split()


def _group_alive(pgid: int) -> bool:
    # fields: [0] state, [1] ppid, [2] pgrp, [3] session
    return any(f[2] == str(pgid) and f[0] != "Z" for _, f in _proc_stats())


def _session_cpu_s(sid: int) -> float:
    """CPU seconds (user + system) of every live process in session ``sid``."""
    ticks = os.sysconf("SC_CLK_TCK")
    return sum(int(f[11]) + int(f[12]) for _, f in _proc_stats() if f[3] == str(sid)) / ticks


def _busy_s() -> float:
    """CPU seconds every core has spent busy since boot, whoever ran (/proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _pids_cpu_s(pids: list[int]) -> float:
    """CPU seconds of the given live processes (all their threads)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class Window:
    """CPU use during a measured window, in cores: the server's tree, the clients, everything else."""

    def __init__(self, server_cpu: Callable[[], float], client_cpu: Callable[[], float]) -> None:
        self._server, self._client = server_cpu, client_cpu
        self._t0 = time.monotonic()
        self._s0, self._c0, self._b0 = server_cpu(), client_cpu(), _busy_s()

    def close(self, cell: Cell) -> Cell:
        elapsed = max(1e-9, time.monotonic() - self._t0)
        server = self._server() - self._s0
        client = self._client() - self._c0
        busy = _busy_s() - self._b0
        cell.server_cores = server / elapsed
        cell.client_cores = client / elapsed
        cell.other_cores = max(0.0, busy - server - client) / elapsed
        return cell


def wait_quiet(limit_s: float, threshold: float = QUIET_CORES) -> float:
    """Wait up to ``limit_s`` for the machine to be idle (< ``threshold`` cores busy over 1 s); the last load."""
    load = 0.0
    for _ in range(max(1, int(limit_s))):
        b0 = _busy_s()
        time.sleep(1.0)
        load = _busy_s() - b0
        if load < threshold:
            break
    return load


class Server:
    """One server subprocess in its own session (so its whole tree can be measured and stopped)."""

    def __init__(self, key: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.key = key
        self.log = log
        self._log_file = log.open("wb")
        self.proc = subprocess.Popen(
            argv, env=env, stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT
        )

    def wait_ready(self, url: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / 0.25) + 1):
            if self.proc.poll() is not None:
                msg = f"{self.key} exited with {self.proc.returncode} before it was ready"
                raise RuntimeError(msg)
            with (
                contextlib.suppress(OSError, urllib.error.URLError),
                urllib.request.urlopen(url, timeout=1.0) as response,
            ):
                if response.status == 200:
                    return
            if time.monotonic() > deadline:
                break
            time.sleep(0.25)
        msg = f"{self.key} was not ready at {url} within {timeout:.0f} s"
        raise TimeoutError(msg)

    def cpu_s(self) -> float:
        return _session_cpu_s(self.proc.pid)

    def stop(self, timeout: float) -> None:
        """SIGTERM, up to ``timeout`` s for a graceful exit, then the rest of its process group."""
        pgid = self.proc.pid
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        for sig, pause in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0)):
            if not _group_alive(pgid):
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, sig)
            deadline = time.monotonic() + pause
            while _group_alive(pgid) and time.monotonic() < deadline:
                time.sleep(0.1)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self._log_file.close()

    def log_tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""


@dataclass
class Target:
    """How to start one server and talk to it."""

    key: str
    argv: list[str]
    env: dict[str, str]
    http_port: int
    grpc_port: int | None
    ready_path: str
    infer_path: str
    body: bytes
    v2: bool


def _venv_env(python: Path) -> dict[str, str]:
    """The environment for a venv's interpreter; with a pyenv (shared) Python, its lib dir on LD_LIBRARY_PATH."""
    env = dict(os.environ)
    prefix = subprocess.run(
        [str(python), "-c", "import sys; print(sys.base_prefix)"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
    lib = str(Path(prefix) / "lib")
    env["LD_LIBRARY_PATH"] = lib + (os.pathsep + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
    return env


def _inferkit_default_intra_op() -> int:
    from inferkit.backends.onnx import default_intra_op_threads

    return default_intra_op_threads(1)


def _target(key: str, model: Path, work: Path, row: Any, intra_op: int, inferkit_cmd: str = "") -> Target:
    http_port, grpc_port = _free_ports(2)
    v2_body = _v2_json(row)
    if key == "inferkit":
        script = Path(sys.executable).with_name("inferkit")
        argv = [str(script)] if script.exists() else [sys.executable, "-m", "inferkit.cli"]
        if inferkit_cmd:
            argv = shlex.split(inferkit_cmd)
        argv += ["serve"]
        if intra_op == _inferkit_default_intra_op():
            argv += [
                str(model),
                "--name",
                MODEL,
                "--max-batch-size",
                str(MAX_BATCH),
                "--max-delay-ms",
                str(MAX_DELAY_MS),
            ]
        else:  # the CLI has no intra-op flag; a config does
            config = work / "inferkit.toml"
            config.write_text(
                f'[[models]]\nname = "{MODEL}"\npath = "{model.name}"\nmax_batch_size = {MAX_BATCH}\n'
                f"max_delay_ms = {MAX_DELAY_MS}\nintra_op_threads = {intra_op}\n"
            )
            argv += ["--config", str(config)]
        argv += ["--host", HOST, "--port", str(http_port), "--grpc-port", str(grpc_port)]
        return Target(
            key, argv, dict(os.environ), http_port, grpc_port, f"/v2/models/{MODEL}/ready", f"/v2/models/{MODEL}/infer",
            v2_body, v2=True,
        )  # fmt: skip
    python = VENVS[key] / "bin" / "python"
    common = ["--model", str(model), "--max-batch-size", str(MAX_BATCH), "--max-delay-ms", str(MAX_DELAY_MS)]
    common += ["--intra-op", str(intra_op)]
    if key == "pytriton":
        argv = [str(python), str(HERE / "pytriton_server.py"), *common, "--name", MODEL]
        argv += ["--http-port", str(http_port), "--grpc-port", str(grpc_port)]
        return Target(
            key, argv, _venv_env(python), http_port, grpc_port, f"/v2/models/{MODEL}/ready",
            f"/v2/models/{MODEL}/infer", v2_body, v2=True,
        )  # fmt: skip
    argv = [str(python), str(HERE / "litserve_server.py"), *common, "--port", str(http_port)]
    return Target(key, argv, dict(os.environ), http_port, None, "/health", "/predict", _litserve_json(row), v2=False)


def _check_answer(target: Target, expected: Any) -> None:
    """One request over JSON; its answer must match ONNX Runtime's."""
    import numpy as np

    request = urllib.request.Request(
        f"http://{HOST}:{target.http_port}{target.infer_path}",
        data=target.body,
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        answer = json.loads(response.read())
    got = answer["outputs"][0]["data"] if target.v2 else answer["output"]
    got = np.asarray(got, dtype=np.float32).reshape(expected.shape)
    if not np.allclose(got, expected, rtol=1e-4, atol=1e-5):
        msg = f"{target.key} answered {got.ravel()[:4]}..., expected {expected.ravel()[:4]}..."
        raise RuntimeError(msg)


def _server_version(target: Target) -> str:
    if target.key == "litserve":
        return _peer_package_version(VENVS["litserve"], "litserve")
    with contextlib.suppress(OSError, ValueError, urllib.error.URLError):
        with urllib.request.urlopen(f"http://{HOST}:{target.http_port}/v2", timeout=5) as response:
            meta = json.loads(response.read())
        version = f"{meta.get('name')} {meta.get('version')}"
        if target.key == "pytriton":
            version = f"nvidia-pytriton {_peer_package_version(VENVS['pytriton'], 'nvidia-pytriton')}, {version}"
        return version
    return "?"


def _peer_package_version(venv: Path, package: str) -> str:
    code = f"import importlib.metadata as m; print(m.version({package!r}))"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            [str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, timeout=60, check=False
        )
        return done.stdout.strip() or "?"
    return "?"


# --------------------------------------------------------------------------- clients


_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _wrk_ms(text: str, percentile: int) -> float | None:
    match = re.search(rf"^\s*{percentile}%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.MULTILINE)
    return float(match.group(1)) * _UNITS_MS[match.group(2)] if match else None


def parse_wrk(text: str) -> Cell:
    """Throughput, p50/p99 and errors (non-2xx responses and socket errors) from ``wrk --latency``."""
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.MULTILINE)
    if rps is None:
        return Cell(note=f"wrk printed no Requests/sec: {text.strip()[-300:]!r}")
    errors = 0
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    if non2xx:
        errors += int(non2xx.group(1))
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if sockets:
        errors += sum(int(g) for g in sockets.groups())
    return Cell(rps=float(rps.group(1)), p50_ms=_wrk_ms(text, 50), p99_ms=_wrk_ms(text, 99), errors=errors)


def _run_wrk(target: Target, work: Path, seconds: float, warmup: float, measure: Callable[[], float]) -> Cell:
    wrk = shutil.which("wrk")
    if wrk is None:
        return Cell(note="skipped: wrk is not installed (benchmarks/server/setup_peers.sh wrk)")
    body = work / f"{target.key}-body.json"
    body.write_bytes(target.body)
    env = dict(os.environ, WRK_BODY_FILE=str(body), WRK_CONTENT_TYPE="application/json")
    url = f"http://{HOST}:{target.http_port}{target.infer_path}"
    base = [wrk, "-t2", f"-c{CONNECTIONS}", "-s", str(HERE / "post.lua")]
    if warmup > 0:
        subprocess.run(
            [*base, f"-d{max(1, round(warmup))}s", url], env=env, capture_output=True, timeout=warmup + 30, check=False
        )
    window = Window(measure, _children_cpu_s)  # wrk's CPU counts once it is reaped, before close()
    done = subprocess.run(
        [*base, f"-d{max(1, round(seconds))}s", "--latency", url],
        env=env,
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=False,
    )
    return window.close(parse_wrk(done.stdout + done.stderr))


def _run_tritonclient(
    kind: str,
    target: Target,
    args: argparse.Namespace,
    measure: Callable[[], float],
) -> Cell:
    seconds, warmup, procs, timeout_s = args.seconds, args.warmup, args.client_procs, args.request_timeout
    grpc_deadline = args.grpc_deadline
    port = target.http_port if kind == "http" else target.grpc_port
    threads = [CONNECTIONS // procs + (1 if i < CONNECTIONS % procs else 0) for i in range(procs)]
    start_at = time.time() + CLIENT_IMPORT_S + warmup
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                *("--worker", kind, "--worker-url", f"{HOST}:{port}", "--worker-threads", str(n)),
                *("--worker-start-at", repr(start_at), "--seconds", repr(seconds)),
                *("--request-timeout", repr(timeout_s), "--grpc-deadline", repr(grpc_deadline)),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in threads
    ]
    time.sleep(max(0.0, start_at - time.time()))
    window = Window(measure, lambda: _pids_cpu_s([w.pid for w in workers]))
    time.sleep(max(0.0, start_at + seconds - time.time()))
    usage = window.close(Cell())
    latencies: list[float] = []
    errors, notes = 0, []
    for worker in workers:
        try:
            out, err = worker.communicate(timeout=timeout_s + 60)
        except subprocess.TimeoutExpired:
            worker.kill()
            out, err = worker.communicate(timeout=10)
            notes.append("a client process had to be killed")
        try:
            result = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            notes.append(f"a client process failed: {err.strip()[-300:]!r}")
            continue
        latencies += result["latencies_ms"]
        errors += result["errors"]
        if result["first_error"]:
            notes.append(result["first_error"][:200])
    if not latencies:
        return Cell(errors=errors, note="; ".join(notes) or "no request completed")
    latencies.sort()
    return Cell(
        rps=len(latencies) / seconds,
        p50_ms=_percentile(latencies, 50),
        p99_ms=_percentile(latencies, 99),
        errors=errors,
        server_cores=usage.server_cores,
        client_cores=usage.client_cores,
        other_cores=usage.other_cores,
        note="; ".join(dict.fromkeys(notes)),
    )


def _percentile(ordered: list[float], p: float) -> float:
    index = min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))  # nearest rank
    return ordered[index]


def worker_main(
    kind: str, url: str, threads: int, start_at: float, seconds: float, timeout_s: float, grpc_deadline: float
) -> None:
    """A client process: ``threads`` closed-loop clients until ``start_at + seconds``; prints JSON."""
    row = _row()
    deadline = grpc_deadline or None  # a gRPC deadline the server sees; None: tritonclient's default, none
    end = start_at + seconds
    lock = threading.Lock()
    latencies: list[float] = []
    counts = {"errors": 0}
    first_error: list[str] = []

    def make_call() -> tuple[Callable[[], Any], Callable[[], None]]:
        if kind == "http":
            from tritonclient import http

            client = http.InferenceServerClient(
                url, concurrency=1, connection_timeout=timeout_s, network_timeout=timeout_s
            )
            inp = http.InferInput(INPUT, [1, IN_DIM], "FP32")
            inp.set_data_from_numpy(row, binary_data=True)
            outs = [http.InferRequestedOutput(OUTPUT, binary_data=True)]
            return (lambda: client.infer(MODEL, [inp], outputs=outs).as_numpy(OUTPUT)), client.close
        from tritonclient import grpc

        gclient = grpc.InferenceServerClient(url)
        ginp = grpc.InferInput(INPUT, [1, IN_DIM], "FP32")
        ginp.set_data_from_numpy(row)
        gouts = [grpc.InferRequestedOutput(OUTPUT)]
        return (
            lambda: gclient.infer(MODEL, [ginp], outputs=gouts, client_timeout=deadline).as_numpy(OUTPUT)
        ), gclient.close

    def loop() -> None:
        mine: list[float] = []
        errors = 0
        call, close = make_call()
        try:
            for _ in range(MAX_REQUESTS_PER_THREAD):
                began = time.time()
                if began >= end:
                    break
                t0 = time.perf_counter()
                try:
                    out = call()
                    if out is None or out.shape != (1, 10):
                        msg = f"unexpected output {out!r:.100}"
                        raise RuntimeError(msg)  # noqa: TRY301
                except Exception as error:
                    if start_at <= time.time() <= end:
                        errors += 1
                    with lock:
                        if not first_error:
                            first_error.append(f"{type(error).__name__}: {error}")
                    time.sleep(0.01)
                    continue
                took = time.perf_counter() - t0
                if start_at <= began + took <= end:
                    mine.append(took * 1e3)
        finally:
            close()
            with lock:
                latencies.extend(mine)
                counts["errors"] += errors

    pool = [threading.Thread(target=loop, daemon=True) for _ in range(threads)]
    for thread in pool:
        thread.start()
    join_by = end + timeout_s + 10  # one deadline for all: a stuck call cannot hold the process for long
    for thread in pool:
        thread.join(max(0.0, join_by - time.time()))
    with lock:
        result = {"latencies_ms": latencies, "errors": counts["errors"], "first_error": "; ".join(first_error)}
    print(json.dumps(result), flush=True)


# --------------------------------------------------------------------------- the run


def _expected(model: bytes, row: Any, intra_op: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op
    session = ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])
    return session.run(None, {INPUT: row})[0]


def _measure_server(
    key: str, args: argparse.Namespace, model_path: Path, work: Path, row: Any, expected: Any
) -> tuple[dict[str, Cell], str]:
    """Start one server, run every selected client against it, stop it."""
    cells: dict[str, Cell] = {}
    busy = wait_quiet(args.quiet_wait)
    if busy >= QUIET_CORES:
        print(
            f"  the machine is busy ({busy:.2f} cores) after waiting {args.quiet_wait:g} s; going on", file=sys.stderr
        )
    target = _target(key, model_path, work, row, args.intra_op, args.inferkit_cmd)
    server = Server(key, target.argv, target.env, work / f"{key}.log")
    version = "?"
    try:
        server.wait_ready(f"http://{HOST}:{target.http_port}{target.ready_path}", args.startup_timeout)
        _check_answer(target, expected)
        version = _server_version(target)
        for client in args.clients:
            print(f"  {SERVERS[key]} x {CLIENTS[client]} ...", file=sys.stderr, flush=True)
            if client != "wrk" and not target.v2:
                cells[client] = Cell(note="n/a: LitServe speaks its own JSON API, not the v2 protocol")
            elif client == "wrk":
                cells[client] = _run_wrk(target, work, args.seconds, args.warmup, server.cpu_s)
            else:
                cells[client] = _run_tritonclient(client, target, args, server.cpu_s)
            if server.proc.poll() is not None:
                msg = f"{key} exited with {server.proc.returncode} during {CLIENTS[client]}"
                raise RuntimeError(msg)  # noqa: TRY301
    except (RuntimeError, TimeoutError, OSError, ValueError, subprocess.SubprocessError) as error:
        note = f"failed: {error}"
        print(f"{SERVERS[key]}: {note}\n{server.log_tail()}", file=sys.stderr, flush=True)
        for client in args.clients:
            cells.setdefault(client, Cell(note=note[:200]))
    finally:
        server.stop(args.stop_timeout)
    return cells, version


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def _cpu(cell: Cell) -> str:
    if cell.server_cores is None:
        return "-"
    return f"{_fmt(cell.server_cores, 2)} / {_fmt(cell.client_cores, 2)} / {_fmt(cell.other_cores, 2)}"


def render(results: dict[str, dict[str, Cell]], clients: list[str], servers: list[str]) -> str:
    """The Markdown table: one row per client x server, with inferkit's ratios on its rows."""
    lines = [
        (
            "| client | server | req/s | p50 ms | p99 ms | errors | CPU cores: server / clients / other "
            "| inferkit ÷ PyTriton (req/s, p99) | inferkit ÷ LitServe (req/s, p99) | note |"
        ),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for client in clients:
        for key in servers:
            cell = results.get(key, {}).get(client, Cell(note="not run"))
            vs = ["", ""]
            mine = results.get("inferkit", {}).get(client)
            if key == "inferkit" and mine is not None and mine.rps is not None:
                for i, peer in enumerate(("pytriton", "litserve")):
                    other = results.get(peer, {}).get(client)
                    if other is not None and other.rps is not None:
                        vs[i] = f"{_ratio(mine.rps, other.rps)}{_round_ratios(mine, other)}, "
                        vs[i] += f"p99 {_ratio(mine.p99_ms, other.p99_ms)}"
            note = cell.note
            if len(cell.rounds) > 1:
                shown = ", ".join("failed" if r is None else f"{r:,.0f}" for r in cell.rounds)
                note = (note + "; " if note else "") + "req/s by round: " + shown
                note += "; p99 ms: " + ", ".join("-" if p is None else f"{p:.1f}" for p in cell.p99_rounds)
            lines.append(
                f"| {CLIENTS[client]} | {SERVERS[key]} | {_fmt(cell.rps, 0)} | {_fmt(cell.p50_ms)} | "
                f"{_fmt(cell.p99_ms)} | {cell.errors if cell.rps is not None else '-'} | "
                f"{_cpu(cell)} | {vs[0]} | {vs[1]} | {note.replace('|', '/')} |"
            )
    return "\n".join(lines)


def targets(results: dict[str, dict[str, Cell]], clients: list[str]) -> list[str]:
    """The issue's targets, one line per client: met or not."""
    out = []
    for client in clients:
        mine = results.get("inferkit", {}).get(client)
        if mine is None or mine.rps is None:
            continue
        checks = []
        triton = results.get("pytriton", {}).get(client)
        if triton is not None and triton.rps is not None:
            ratio = mine.rps / triton.rps
            ok = ratio >= TARGET_VS_PYTRITON
            checks.append(f"{ratio:.2f}x PyTriton {'✓' if ok else '✗'} (≥ {TARGET_VS_PYTRITON}x)")
            if mine.p99_ms is not None and triton.p99_ms is not None:
                ok = mine.p99_ms < triton.p99_ms
                checks.append(f"p99 {mine.p99_ms:.1f} vs {triton.p99_ms:.1f} ms {'✓' if ok else '✗'}")
        lit = results.get("litserve", {}).get(client)
        if lit is not None and lit.rps is not None:
            ratio = mine.rps / lit.rps
            checks.append(
                f"{ratio:.2f}x LitServe {'✓' if ratio >= TARGET_VS_LITSERVE else '✗'} (≥ {TARGET_VS_LITSERVE}x)"
            )
        if checks:
            out.append(f"- {CLIENTS[client]}: " + ", ".join(checks))
    return out


def _versions() -> str:
    found = []
    for package in ("inferkit", "onnxruntime", "uvicorn", "grpcio", "tritonclient"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found.append(f"{package} {importlib.metadata.version(package)}")
    return ", ".join(found)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="inferkit vs PyTriton vs LitServe over HTTP and gRPC (32 connections)."
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per cell (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each cell (default 2)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat everything; report each cell's median round")
    parser.add_argument("--servers", default="inferkit,pytriton,litserve", help="comma-separated subset")
    parser.add_argument("--clients", default="wrk,http,grpc", help="comma-separated subset of wrk,http,grpc")
    parser.add_argument("--intra-op", type=int, default=1, help="ORT intra_op_num_threads for every server (default 1)")
    parser.add_argument("--client-procs", type=int, default=4, help="tritonclient processes sharing the 32 connections")
    parser.add_argument("--request-timeout", type=float, default=10.0, help="tritonclient-HTTP socket timeout, s")
    parser.add_argument(
        "--grpc-deadline",
        type=float,
        default=0.0,
        help="gRPC deadline (client_timeout) per request, s; 0 (default): none, as tritonclient and the HTTP clients",
    )
    parser.add_argument("--startup-timeout", type=float, default=120.0, help="seconds for a server to become ready")
    parser.add_argument(
        "--quiet-wait", type=float, default=60.0, help="seconds to wait for an idle machine before each server"
    )
    parser.add_argument("--stop-timeout", type=float, default=20.0, help="seconds after SIGTERM before SIGKILL")
    parser.add_argument(
        "--inferkit-cmd",
        default="",
        help="run this command instead of the venv's `inferkit` (its `serve ...` arguments are appended), "
        "e.g. to measure a candidate change: 'env PYTHONPATH=/tmp/x .venv/bin/python my_launcher.py'",
    )
    parser.add_argument("--worker", choices=("http", "grpc"), help=argparse.SUPPRESS)
    parser.add_argument("--worker-url", help=argparse.SUPPRESS)
    parser.add_argument("--worker-threads", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-start-at", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(
            args.worker,
            args.worker_url,
            args.worker_threads,
            args.worker_start_at,
            args.seconds,
            args.request_timeout,
            args.grpc_deadline,
        )
        sys.stdout.flush()
        os._exit(0)  # not waiting for a client thread still stuck in a call (it is reported as missing)

    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    args.clients = [c.strip() for c in args.clients.split(",") if c.strip()]
    bad = [s for s in servers if s not in SERVERS] + [c for c in args.clients if c not in CLIENTS]
    if bad or not 1 <= args.client_procs <= CONNECTIONS or args.rounds < 1 or args.seconds <= 0:
        parser.error(f"unknown or invalid selection {bad}" if bad else "check --client-procs, --rounds, --seconds")

    skipped: dict[str, str] = {}
    for key in servers:
        venv = VENVS.get(key)
        if venv is not None and not (venv / "bin" / "python").exists():
            skipped[key] = f"skipped: {venv.name} is missing (run benchmarks/server/setup_peers.sh)"
    runnable = [s for s in servers if s not in skipped]

    model = _model_bytes()
    row = _row()
    expected = _expected(model, row, args.intra_op)
    load0 = os.getloadavg()
    rounds: dict[str, dict[str, list[Cell]]] = {s: {c: [] for c in args.clients} for s in runnable}
    versions: dict[str, str] = {}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="inferkit-bench-server-") as tmp:
        work = Path(tmp)
        model_path = work / f"{MODEL}.onnx"
        model_path.write_bytes(model)
        for r in range(args.rounds):
            for key in runnable[r % len(runnable) :] + runnable[: r % len(runnable)]:  # each round starts elsewhere
                print(f"round {r + 1}/{args.rounds}: {SERVERS[key]}", file=sys.stderr, flush=True)
                cells, versions[key] = _measure_server(key, args, model_path, work, row, expected)
                for client, cell in cells.items():
                    rounds[key][client].append(cell)
    results: dict[str, dict[str, Cell]] = {
        key: {c: _median_cell(cells) for c, cells in per.items()} for key, per in rounds.items()
    }
    for key, note in skipped.items():
        results[key] = {c: Cell(note=note) for c in args.clients}

    print(
        f"## Serving benchmark: MLP 256→1024→1024→10, 1-row requests, {CONNECTIONS} connections\n\n"
        f"{platform.node()}: {os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}; "
        f"load average {load0[0]:.2f} before, {os.getloadavg()[0]:.2f} after; "
        f"{args.seconds:g} s measured per cell after {args.warmup:g} s warm-up; rounds {args.rounds}; "
        f"{time.monotonic() - started:.0f} s in all.\n"
        f"Every server: ORT CPU, intra_op_num_threads={args.intra_op}, inter_op_num_threads=1, "
        f"max batch {MAX_BATCH}, max delay {MAX_DELAY_MS:g} ms, 127.0.0.1. "
        f"wrk: -t2 -c{CONNECTIONS}; tritonclient: {args.client_procs} processes x "
        f"{CONNECTIONS // args.client_procs} threads.\n"
    )
    print(render(results, args.clients, servers))
    others = [c.other_cores for per in results.values() for c in per.values() if c.other_cores is not None]
    if others and max(others) > OTHER_LOAD_WARNING:
        print(
            f"\nWarning: other processes used up to {max(others):.2f} cores during a measured cell; "
            "those numbers are disturbed: rerun on a quiet machine (or with --rounds 3)."
        )
    lines = targets(results, args.clients)
    if lines:
        print("\nTargets (inferkit ≥ 1.3x PyTriton and ≥ 3x LitServe in req/s, p99 below PyTriton's):")
        print("\n".join(lines))
    print(
        f"\nVersions: {_versions()}" + "".join(f"; {SERVERS[k]}: {v}" for k, v in versions.items() if k != "inferkit")
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
