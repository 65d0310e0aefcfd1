"""gRPC tail latency at the same offered load: inferkit against PyTriton, open loop.

``bench_server.py`` runs closed loops (32 requests in flight): a server twice as fast answers
twice as many requests with the same 32 in flight, so its p99 there is not comparable with a
slower server's. Here each server gets the same fixed rate of requests (``--rates``, req/s in
total, spread over ``--procs`` client processes with ``tritonclient.grpc``'s ``async_infer``),
sent on schedule whatever the answers do, and a request's latency runs from its scheduled send
to its answer (no coordinated omission: a stalled server is charged for every request it
delayed). "server CPU" is the server's whole process tree's CPU time from the clients' start to
their exit, per answered request; "send lag" is how late the clients themselves sent (their
share of the latency: a client that falls behind is not the server's fault). Client process k
starts k/rate after the first, so that together they send evenly. Servers, model and batching
are ``bench_server.py``'s; each (rate, server) cell starts its own server, warms up for a
second at the rate, then measures ``--seconds``; the two servers alternate, ``--rounds`` times.

Run: ``.venv/bin/python benchmarks/server/open_loop.py --rates 1000,1500 --rounds 2`` (needs
``.venv-pytriton`` from ``benchmarks/server/setup_peers.sh``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import bench_server as bs

WARMUP_S = 1.0
START_DELAY_S = 2.0  # client processes import tritonclient before the first scheduled send
ANSWER_WAIT_S = 30.0  # after the last send, for the answers still due


def client_main(url: str, rate: float, seconds: float, start_at: float) -> None:
    """One client process: ``rate`` req/s on schedule for ``seconds``; prints JSON latencies (ms)."""
    from tritonclient import grpc

    client = grpc.InferenceServerClient(url)
    inp = grpc.InferInput(bs.INPUT, [1, bs.IN_DIM], "FP32")
    inp.set_data_from_numpy(bs._row())
    outputs = [grpc.InferRequestedOutput(bs.OUTPUT)]
    latencies: list[float] = []
    lags: list[float] = []  # how late each call left the client: the client's share of the latency
    errors = [0]
    lock = threading.Lock()
    answered = threading.Semaphore(0)
    count = int(rate * seconds)
    time.sleep(max(0.0, start_at - time.time()))
    t0 = time.perf_counter()
    for i in range(count):
        due = t0 + i / rate
        time.sleep(max(0.0, due - time.perf_counter()))
        lags.append((time.perf_counter() - due) * 1e3)

        def done(result: Any, error: Any, due: float = due) -> None:  # noqa: ARG001 (passed by name)
            took = time.perf_counter() - due
            with lock:
                if error is None:
                    latencies.append(took * 1e3)
                else:
                    errors[0] += 1
            answered.release()

        client.async_infer(bs.MODEL, [inp], done, outputs=outputs)
    wait_until = time.monotonic() + ANSWER_WAIT_S  # one bound for all: a lost answer costs no more
    lost = sum(not answered.acquire(timeout=max(0.0, wait_until - time.monotonic())) for _ in range(count))
    client.close()
    print(json.dumps({"latencies_ms": latencies, "lags_ms": lags, "errors": errors[0] + lost}))


def measure(key: str, rate: float, args: argparse.Namespace, work: Path) -> str:
    """One cell: start ``key``'s server, warm up, measure; its line of the table."""
    import numpy as np

    model = work / "mlp.onnx"
    if not model.exists():
        model.write_bytes(bs._model_bytes())
    target = bs._target(key, model, work, bs._row(), 1)
    server = bs.Server(key, target.argv, target.env, work / f"{key}.log")
    try:
        server.wait_ready(f"http://{bs.HOST}:{target.http_port}{target.ready_path}", args.startup_timeout)
        url = f"{bs.HOST}:{target.grpc_port}"
        for seconds in (WARMUP_S, args.seconds):
            start_at = time.time() + START_DELAY_S
            procs = []
            for k in range(args.procs):  # process k starts k/rate later: together they send evenly
                began = repr(start_at + k / rate)
                argv = [sys.executable, __file__, "--client", url, repr(rate / args.procs), repr(seconds), began]
                procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, text=True))
            cpu = server.cpu_s()
            try:
                results = [json.loads(p.communicate(timeout=seconds + START_DELAY_S + 60)[0]) for p in procs]
            finally:
                for p in procs:
                    p.kill()  # (exited already, unless something failed)
            cpu = server.cpu_s() - cpu
    finally:
        server.stop(10.0)
    latencies = np.array([ms for r in results for ms in r["latencies_ms"]])
    lag99 = np.percentile([ms for r in results for ms in r["lags_ms"]], 99)
    errors = sum(r["errors"] for r in results)
    if not len(latencies):
        return f"| {rate:,.0f} | {bs.SERVERS[key]} | - | - | - | - | - | {lag99:.1f} | {errors} |"
    p50, p90, p99 = np.percentile(latencies, [50, 90, 99])
    per = cpu / len(latencies) * 1e6
    cells = f"{len(latencies):,} | {p50:.1f} | {p90:.1f} | {p99:.1f} | {per:.0f} | {lag99:.1f} | {errors}"
    return f"| {rate:,.0f} | {bs.SERVERS[key]} | {cells} |"


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        client_main(sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="1000,1500", help="comma-separated offered loads, req/s in total")
    parser.add_argument("--seconds", type=float, default=6.0, help="measured seconds per cell")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--procs", type=int, default=2, help="client processes sharing the rate")
    parser.add_argument("--startup-timeout", type=float, default=60.0)
    args = parser.parse_args()
    servers = [k for k in ("inferkit", "pytriton") if k == "inferkit" or bs.VENVS[k].exists()]
    columns = ["offered req/s", "server", "answered", "p50 ms", "p90 ms", "p99 ms", "server CPU µs/req"]
    columns += ["send lag p99 ms", "errors"]
    print(f"| {' | '.join(columns)} |")
    print("|---" * len(columns) + "|")
    with tempfile.TemporaryDirectory() as work:
        for _ in range(args.rounds):
            for rate in (float(r) for r in args.rates.split(",")):
                for key in servers:
                    print(measure(key, rate, args, Path(work)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
