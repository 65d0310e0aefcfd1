"""Quickstart: many threads, one model, dynamic batching.

Loads the bundled digits classifier (``models/digits.onnx``) into an
``inferkit.Predictor`` with two replicas, then has 32 threads send small requests
(1 to 8 rows each, slices of the held-out test set) as fast as they can. inferkit
coalesces those concurrent requests into batches of up to 64 rows, waiting at most
2 ms for a batch to fill.

It prints throughput, request latency and how the requests were batched, and checks
that batching changes nothing: every row's label must match what onnxruntime returns
for the whole test set in one call, so the accuracy is the same. Exits 1 otherwise.

Run it with ``python examples/quickstart.py``.
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import NamedTuple

import numpy as np
import onnxruntime as ort
from _digits import MODEL, test_split

import inferkit

REPLICAS = 2
MAX_BATCH_SIZE = 64
MAX_DELAY_MS = 2
THREADS = 32
REQUESTS_PER_THREAD = 200
MAX_ROWS = 8
TIME_LIMIT_S = 2.0
SEED = 0


class Result(NamedTuple):
    """One answered request: its first test row, the labels it got, its latency."""

    start: int
    labels: np.ndarray
    latency_s: float


def make_workload(n_rows: int, rng: np.random.Generator) -> tuple[list[tuple[int, int]], int]:
    """Return ``(start, rows)`` request slices and how many leading ones tile the rows.

    The first slices tile the test set once, so every row gets a batched prediction;
    the rest are random slices of 1 to ``MAX_ROWS`` rows.
    """
    slices: list[tuple[int, int]] = []
    start = 0
    while start < n_rows:
        rows = min(int(rng.integers(1, MAX_ROWS + 1)), n_rows - start)
        slices.append((start, rows))
        start += rows
    covering = len(slices)
    while len(slices) < THREADS * REQUESTS_PER_THREAD:
        rows = int(rng.integers(1, MAX_ROWS + 1))
        slices.append((int(rng.integers(0, n_rows - rows + 1)), rows))
    return slices, covering


def run_client(
    predictor: inferkit.Predictor,
    x: np.ndarray,
    slices: list[tuple[int, int]],
    thread: int,
    *,
    covering: int,
    deadline: float,
) -> list[Result]:
    """Send this thread's share of ``slices``, one request at a time.

    It stops at ``deadline``, but not before its slices that tile the test set.
    """
    results: list[Result] = []
    for index in range(thread, len(slices), THREADS):
        if index >= covering and time.perf_counter() > deadline:
            break
        start, rows = slices[index]
        sent = time.perf_counter()
        out = predictor.predict(x[start : start + rows])
        results.append(Result(start, out["label"], time.perf_counter() - sent))
    return results


def main() -> int:
    """Run the demo and return the process exit code."""
    x, y = test_split()
    direct = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    direct_labels = direct.run(["label"], {"input": x})[0]
    direct_acc = float(np.mean(direct_labels == y))
    slices, covering = make_workload(len(x), np.random.default_rng(SEED))

    with inferkit.Predictor.from_onnx(
        MODEL,
        max_batch_size=MAX_BATCH_SIZE,
        max_delay_ms=MAX_DELAY_MS,
        replicas=REPLICAS,
    ) as predictor:
        sample = predictor.submit(x[:4]).result(timeout=10)
        began = time.perf_counter()
        with ThreadPoolExecutor(max_workers=THREADS) as pool:
            deadline = began + TIME_LIMIT_S
            client = partial(run_client, predictor, x, slices, covering=covering, deadline=deadline)
            results = [r for rs in pool.map(client, range(THREADS)) for r in rs]
        elapsed = time.perf_counter() - began
        stats = predictor.stats()

    batched = np.full(len(x), -1, dtype=np.int64)
    wrong_rows = 0
    for r in results:
        rows = slice(r.start, r.start + len(r.labels))
        wrong_rows += int(np.sum(r.labels != direct_labels[rows]))
        batched[rows] = r.labels
    batched_acc = float(np.mean(batched == y))
    n_requests = len(results)
    n_rows = sum(len(r.labels) for r in results)
    p50, p99 = np.percentile([r.latency_s * 1e3 for r in results], [50, 99])
    batches = sum(stats.batch_sizes.values())
    mean_rows = sum(k * v for k, v in stats.batch_sizes.items()) / max(batches, 1)
    by_count = sorted(stats.dispatch_reasons.items(), key=lambda kv: -kv[1])
    reasons = ", ".join(f"{k}={v}" for k, v in by_count)

    report = [
        (
            f"inferkit quickstart: {MODEL.name}, replicas={REPLICAS}, "
            f"max_batch_size={MAX_BATCH_SIZE}, max_delay_ms={MAX_DELAY_MS}"
        ),
        f"  sample      x[:4] -> {sample['label'].tolist()}, true {y[:4].tolist()}",
        (f"  load        {THREADS} threads, {n_requests} requests, {n_rows} rows in {elapsed:.2f} s"),
        (f"  throughput  {n_requests / elapsed:,.0f} requests/s, {n_rows / elapsed:,.0f} rows/s"),
        f"  latency     p50 {p50:.2f} ms, p99 {p99:.2f} ms",
        f"  batching    {stats.batches} batches, mean {mean_rows:.1f} rows; {reasons}",
        (f"  accuracy    batched {batched_acc:.4f}, direct onnxruntime {direct_acc:.4f} ({len(y)} test rows)"),
    ]
    print("\n".join(report))

    if batched_acc != direct_acc or wrong_rows or np.any(batched < 0):
        print(
            f"FAIL: {wrong_rows} batched labels differ from direct onnxruntime",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
