"""Router overhead: ``Router.predict`` against calling the chosen ``Predictor`` directly.

What is measured
----------------
One ``inferkit.Predictor.from_onnx`` over the benchmark MLP (``models.mlp_bytes()``:
float32 256 -> 1024 -> 1024 -> 10, onnxruntime CPU, inferkit's default intra-op threads),
1-row requests, called four ways:

``direct``
    ``predictor.predict(x)``: the baseline.
``Fixed``
    ``Router({"v1": predictor}, Fixed("v1")).predict(x)``: the router's fixed costs (policy
    call, per-arm counters, the experiment's latency window, canary feedback plumbing).
``ABTest``
    ``Router({"a": predictor, "b": predictor}, ABTest({"a": 1, "b": 1})).predict(x)``: both
    arms are the **same** predictor object, so batching is identical to ``direct`` and only
    the cost of a weighted random pick is added.
``ABTest key``
    the same router with ``key=`` (a rotating pool of 10,000 user ids): BLAKE2b hashing of the
    key and remembering the key's arm for ``record``, as in a sticky canary.

Each at two loads:

``c=1``
    One closed-loop client, ``max_delay_ms=0`` (nothing waits for companions): the router's
    added latency per request. ``added p50`` is the router cell's p50 minus the direct cell's
    p50 of the same round.
``c=32``
    32 closed-loop client threads (each sends a request, waits for it, sends the next), on a
    predictor with ``max_batch_size=64, max_delay_ms=2`` as in ``bench_batching.py``: the
    router's cost at saturation, where it competes with the batcher and the model for the GIL.
    ``vs direct`` is rows/s over the direct cell's rows/s of the same round.

Under the table, ``router CPU`` is the router's own work per request, timed in one thread
over a no-op arm (best of 3): a figure free of the machine's noise. At saturation on a
GIL-bound machine that CPU time comes out of the throughput, so it is printed as a share of
one core at the direct c=32 rate too: the loss to expect when the cells are too noisy to
show it.

The cells of a load run interleaved (direct, then every router cell, in an order that rotates
every round), all on the same warm predictor; with ``--rounds N`` (default 3) every figure is
the median over rounds, and ratios and deltas are taken within a round before the median.

Targets
-------
* **Throughput**: at most **5%** loss at saturation (``vs direct`` >= 0.95 at c=32).
* **Latency**: at most **20 µs** added p50 per request at c=1.

Lines under the table say whether each router cell met them, and warn when the direct
c=32 cell moved more than 10% between rounds (the ratios are then within noise). On a small shared machine
(this was written for 2 busy cores) single cells vary by several percent; compare within a
run, look at the spread column, and prefer more rounds over longer cells.

Run ``python benchmarks/bench_router.py`` (``--seconds 1 --rounds 1`` for a quick look).
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort
from bench_batching import CellConfig, CellResult, check_outputs, client_inputs, make_session, run_closed_loop
from models import INPUT_DIM, OUTPUT_DIM, mlp_bytes

from inferkit import ABTest, Fixed, Predictor, Router

CLIENTS = 32
MAX_BATCH = 64
LOADED_DELAY_MS = 2.0
KEYS = 10_000
MAX_P50_ADDED_US = 20.0
MIN_THROUGHPUT_RATIO = 0.95
NOISE_WARNING = 0.10
CELLS = ("direct", "Fixed", "ABTest", "ABTest key")


@dataclass
class Cell:
    """One cell's results over rounds, with its per-round comparison to direct."""

    name: str
    load: str
    results: list[CellResult] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)  # rows/s over direct's, per round
    added_us: list[float] = field(default_factory=list)  # p50 minus direct's, per round

    def median(self, attr: str) -> float:
        return float(statistics.median(getattr(r, attr) for r in self.results))


def calls(predictor: Predictor | _Stub) -> dict[str, Callable[[Any], Any]]:
    """The four ways of calling ``predictor``, by cell name (the routers are never closed)."""
    fixed = Router({"v1": predictor}, Fixed("v1"), seed=0)
    ab = Router({"a": predictor, "b": predictor}, ABTest({"a": 1, "b": 1}), seed=0)
    users = [f"user-{i}" for i in range(KEYS)]
    counter = itertools.count()

    def keyed(x: Any) -> Any:
        return ab.predict(x, key=users[next(counter) % KEYS])

    return {"direct": predictor.predict, "Fixed": fixed.predict, "ABTest": ab.predict, "ABTest key": keyed}


class _Stub:
    """An arm that answers at once: what remains of a routed call is the router's own work."""

    def predict(self, x: Any, *, timeout: float | None = None, priority: int = 0) -> Any:  # noqa: ARG002
        return x

    def submit(self, x: Any, *, timeout: float | None = None, priority: int = 0) -> Any:
        raise NotImplementedError

    def stats(self) -> None:
        return None

    def close(self, timeout: float | None = None) -> None:
        pass


def router_cpu_us(x: Any, seconds: float = 0.3) -> dict[str, float]:
    """µs of one thread's time per routed call over a no-op arm, by cell (best of 3 runs)."""
    by_name = calls(_Stub())
    out: dict[str, float] = {}
    for name, call in by_name.items():
        best = float("inf")
        for _ in range(3):
            n, t0 = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - t0) < seconds / 3:
                for _ in range(1000):
                    call(x)
                n += 1000
            best = min(best, elapsed / n * 1e6)
        out[name] = best
    return {name: us - out["direct"] for name, us in out.items() if name != "direct"}


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def run_load(
    load: str, predictor: Predictor, inputs: list[Any], cfg: CellConfig, rounds: int, session: ort.InferenceSession
) -> list[Cell]:
    """Every cell of one load, interleaved over ``rounds``."""
    by_name = calls(predictor)
    for call in by_name.values():
        check_outputs(call, session, 1)
    cells = {name: Cell(name, load) for name in CELLS}
    for k in range(rounds):
        routers = list(CELLS[1:])
        shift = k % len(routers)
        order = ["direct", *routers[shift:], *routers[:shift]]
        for name in order:
            log(f"round {k + 1}/{rounds}: {load} {name}")
            cells[name].results.append(run_closed_loop(by_name[name], inputs, cfg))
        direct = cells["direct"].results[-1]
        for name in routers:
            ours = cells[name].results[-1]
            cells[name].ratios.append(ours.rows_per_s / direct.rows_per_s)
            cells[name].added_us.append((ours.p50_ms - direct.p50_ms) * 1000.0)
    return list(cells.values())


def _spread(values: list[float]) -> str:
    return f"{min(values):,.0f}-{max(values):,.0f}" if len(values) > 1 else "-"


def render(cells: list[Cell]) -> str:
    header = "| load | cell | rows/s | vs direct | p50 µs | p99 µs | added p50 µs | rows/s over rounds |"
    lines = [header, "|" + "---|" * 8]
    for c in cells:
        ratio = f"{statistics.median(c.ratios):.3f}" if c.ratios else "1"
        added = f"{statistics.median(c.added_us):+.1f}" if c.added_us else "-"
        rates = [r.rows_per_s for r in c.results]
        lines.append(
            f"| {c.load} | {c.name} | {c.median('rows_per_s'):,.0f} | {ratio} | {c.median('p50_ms') * 1000:.1f} | "
            f"{c.median('p99_ms') * 1000:.1f} | {added} | {_spread(rates)} |"
        )
    return "\n".join(lines)


def verdicts(latency: list[Cell], loaded: list[Cell]) -> list[str]:
    lines = []
    for c in latency[1:]:
        added = statistics.median(c.added_us)
        ok = "met" if added <= MAX_P50_ADDED_US else "MISSED"
        lines.append(f"{c.name}: added p50 {added:+.1f} µs at c=1 (target ≤ {MAX_P50_ADDED_US:g}): {ok}")
    for c in loaded[1:]:
        ratio = statistics.median(c.ratios)
        ok = "met" if ratio >= MIN_THROUGHPUT_RATIO else "MISSED"
        lines.append(
            f"{c.name}: throughput {ratio:.3f} of direct at c={CLIENTS} "
            f"(target ≥ {MIN_THROUGHPUT_RATIO:g}, i.e. ≤ 5% loss): {ok}"
        )
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per cell (default 3)")
    parser.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds before each cell (default 0.5)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; figures are medians (default 3)")
    parser.add_argument(
        "--max-requests", type=int, default=500_000, help="a cell also ends after this many measured requests"
    )
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.seconds <= 0:
        parser.error("--seconds must be > 0")
    return args


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = CellConfig(seconds=args.seconds, warmup=args.warmup, max_requests=args.max_requests)
    model = mlp_bytes()
    session = make_session(model, 1)
    load_before = os.getloadavg()[0]
    began = time.perf_counter()
    with Predictor.from_onnx(model, max_batch_size=MAX_BATCH, max_delay_ms=0.0) as predictor:
        latency = run_load("c=1", predictor, client_inputs(1, clients=1), cfg, args.rounds, session)
    with Predictor.from_onnx(model, max_batch_size=MAX_BATCH, max_delay_ms=LOADED_DELAY_MS) as predictor:
        loaded = run_load(f"c={CLIENTS}", predictor, client_inputs(1, clients=CLIENTS), cfg, args.rounds, session)
    elapsed = time.perf_counter() - began
    load_after = os.getloadavg()[0]

    print(
        f"MLP {INPUT_DIM}->1024->1024->{OUTPUT_DIM} float32, 1-row requests | onnxruntime {ort.__version__}, "
        f"numpy {np.__version__}, Python {platform.python_version()} | {_cpus()} CPUs"
    )
    print(
        f"cells: {cfg.seconds:g} s measured after {cfg.warmup:g} s warm-up, {args.rounds} interleaved round(s), "
        f"medians | c=1: max_delay_ms=0 | c={CLIENTS}: max_batch_size={MAX_BATCH}, max_delay_ms={LOADED_DELAY_MS:g}"
    )
    print(f"load average (1 min) {load_before:.2f} before, {load_after:.2f} after; {elapsed:.0f} s in all")
    print()
    print(render(latency + loaded))
    print()
    for line in verdicts(latency, loaded):
        print(line)
    cpu = router_cpu_us(client_inputs(1, clients=1)[0])
    print(
        "router CPU per request over a no-op arm, one thread: "
        + ", ".join(f"{name} {us:.1f} µs" for name, us in cpu.items())
        + f" (at the c={CLIENTS} direct rate, {loaded[0].median('rows_per_s'):,.0f} req/s, that is "
        + ", ".join(f"{us * 1e-6 * loaded[0].median('rows_per_s'):.1%}" for us in cpu.values())
        + " of one core)"
    )
    rates = [r.rows_per_s for r in loaded[0].results]
    if len(rates) > 1 and (noise := (max(rates) - min(rates)) / max(rates)) > NOISE_WARNING:
        print(
            f"\nWARNING: direct c={CLIENTS} moved {noise:.0%} between rounds, more than the 5% being measured: "
            "the machine was busy, so the c=32 ratios are within noise. Rerun with more --rounds."
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
