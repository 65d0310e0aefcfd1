"""Does the status page cost the hot path anything? Requests/s with and without a page polling it.

The page polls ``/v2/status`` every 2 s; here a poller asks 20 times as often (every 0.1 s) while
client threads send inference requests over HTTP. Both runs happen in one process, one after
the other, and the table reports their ratio (never an absolute time as a pass bar).

    python benchmarks/server/bench_status.py [--seconds 5] [--clients 8] [--rounds 3]

Rounds alternate (off, on, off, on, ...) and medians are reported, with the process CPU per
request beside requests/s: on a shared machine the CPU figure moves less than throughput.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import httpx
import numpy as np

from inferkit import Predictor, TensorSpec
from inferkit.server import Repository
from inferkit.server.run import InferenceServer

SPEC = [TensorSpec("x", np.float32, (None, 4))]
BODY = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}


def run(port: int, seconds: float, clients: int, poll_s: float | None) -> tuple[float, int, float]:
    """Requests/s, polls made, and process CPU microseconds per request (server and clients: one process)."""
    stop = threading.Event()
    counts = [0] * clients
    polls = [0]

    def client(i: int) -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            while not stop.is_set():
                c.post("/v2/models/m/infer", json=BODY).raise_for_status()
                counts[i] += 1

    def poller() -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            while not stop.wait(poll_s):
                c.get("/v2/status").raise_for_status()
                polls[0] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    if poll_s is not None:
        threads.append(threading.Thread(target=poller))
    start, cpu = time.perf_counter(), time.process_time()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    done = sum(counts)
    return done / (time.perf_counter() - start), polls[0], (time.process_time() - cpu) / max(done, 1) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="alternating off/on pairs; medians are reported")
    args = parser.parse_args()
    predictor = Predictor.from_callable(lambda x: x * 2, inputs=SPEC, name="m")
    server = InferenceServer(Repository({"m": predictor}), port=0, grpc_port=None, status_page=True).start()
    offs, ons = [], []
    try:
        run(server.port, 1.0, args.clients, None)  # warm up
        for _ in range(args.rounds):  # alternated, so that a burst of outside load hits both alike
            offs.append(run(server.port, args.seconds, args.clients, None))
            ons.append(run(server.port, args.seconds, args.clients, 0.1))
    finally:
        server.join(30)
    rate_off, rate_on = statistics.median(r[0] for r in offs), statistics.median(r[0] for r in ons)
    cpu_off, cpu_on = statistics.median(r[2] for r in offs), statistics.median(r[2] for r in ons)
    title = f"run (median of {args.rounds} rounds)"
    print(f"{title:<34} {'requests/s':>11} {'ratio':>7} {'CPU µs/req':>11} {'ratio':>7}")
    print(f"{'no page':<34} {rate_off:>11.0f} {1.0:>7.3f} {cpu_off:>11.0f} {1.0:>7.3f}")
    print(
        f"{'page polled every 0.1 s':<34} {rate_on:>11.0f} {rate_on / rate_off:>7.3f} {cpu_on:>11.0f} "
        f"{cpu_on / cpu_off:>7.3f}   ({sum(r[1] for r in ons)} polls)"
    )
    spread = max(r[0] for r in offs) / min(r[0] for r in offs)
    print(f"{'noise: max/min requests/s, no page':<34} {spread:>11.3f}")


if __name__ == "__main__":
    main()
