"""Does the status page cost the hot path anything? Requests/s with and without a page polling it.

The page polls ``/v2/status`` every 2 s; here a poller asks 20 times as often (every 0.1 s) while
client threads send inference requests over HTTP. Both runs happen in one process, one after
the other, and the table reports their ratio (never an absolute time as a pass bar).

    python benchmarks/server/bench_status.py [--seconds 5] [--clients 8]
"""

from __future__ import annotations

import argparse
import threading
import time

import httpx
import numpy as np

from inferkit import Predictor, TensorSpec
from inferkit.server import Repository
from inferkit.server.run import InferenceServer

SPEC = [TensorSpec("x", np.float32, (None, 4))]
BODY = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}


def run(port: int, seconds: float, clients: int, poll_s: float | None) -> tuple[float, int]:
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
    start = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - start), polls[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    predictor = Predictor.from_callable(lambda x: x * 2, inputs=SPEC, name="m")
    server = InferenceServer(Repository({"m": predictor}), port=0, grpc_port=None, status_page=True).start()
    try:
        run(server.port, 1.0, args.clients, None)  # warm up
        off, _ = run(server.port, args.seconds, args.clients, None)
        on, polls = run(server.port, args.seconds, args.clients, 0.1)
        again, _ = run(server.port, args.seconds, args.clients, None)
    finally:
        server.join(30)
    base = (off + again) / 2
    print(f"{'run':<34} {'requests/s':>11} {'ratio':>7}")
    print(f"{'no page (mean of before and after)':<34} {base:>11.0f} {1.0:>7.3f}")
    print(f"{'page polled every 0.1 s':<34} {on:>11.0f} {on / base:>7.3f}   ({polls} polls)")
    print(f"{'run-to-run noise (after/before)':<34} {'':>11} {again / off:>7.3f}")


if __name__ == "__main__":
    main()
