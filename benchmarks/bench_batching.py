"""Dynamic batching benchmark: inferkit against the obvious alternatives, in one run.

What is measured
----------------
Every row serves the same model (``models.mlp_bytes()``: float32 MLP
256 -> 1024 -> 1024 -> 10, symbolic batch) on onnxruntime's CPU provider with
``inter_op_num_threads=1``. Unless a row says otherwise, 32 *closed-loop* client
threads each send one request, wait for its answer, and immediately send the
next, so the offered load adapts to the server and nothing queues without bound.

``limit``
    One thread calling ``session.run`` on ready-made batches of 64 and 256 rows
    with ``intra_op_num_threads`` 1 and 2; the best of the four is the model's
    batched throughput on this machine. Its p50/p99 are per *batch call*. The
    winning setting is measured again after every other row and the better of
    the two is kept; the notes give both, and a warning follows the table when
    they differ by more than 15% (the machine was busy: rerun). With
    ``--rounds`` the limit is the median round instead, and the warning looks
    at its spread across rounds.
``direct 32 thr``
    32 threads calling ``session.run`` on one shared session with 1-row inputs:
    no batching, only onnxruntime's own concurrency.
``naive batcher``
    ``naive_batcher.NaiveBatcher``: queue + ``Future`` + one worker that waits up
    to 2 ms or 64 requests after the first one. The straw man.
``batched (PyPI)``
    The ``batched`` package's thread batcher (``batched.dynamically``,
    ``batch_size=64, timeout_ms=2``) around a function that stacks rows and calls
    ``session.run``. Skipped with a note when ``batched`` is not installed.
    (Its ``batched.inference`` variant pads inputs into int64 token arrays, so it
    cannot carry float features.)
``lean batcher 1-row`` / ``8-row``
    ``lean_batcher.LeanBatcher``: one worker, a raw lock per caller, whatever is
    queued (up to 64 rows) the moment the model is free; no timer, checks,
    counters or error handling; its session's threads never spin (ONNX Runtime's
    ``allow_spinning=0``: with 2 threads beside 32 callers, 1.04-1.3x the rows/s
    of spinning ones on 2 cores). About the most a batcher of Python threads gets
    out of this machine: ``inferkit 1-row`` and ``8-row`` note their share of it
    (what inferkit's features and safety cost), beside their share of ``limit``
    (what is left on the table by batching in CPython at all).
``inferkit ...``
    ``inferkit.Predictor.from_onnx(..., max_batch_size=64, max_delay_ms=2)``
    with 1-row or 8-row requests; ``shared r2`` / ``rr`` use two replicas behind
    the shared queue / per-replica round-robin queues; intra-op threads are
    inferkit's default. Mean batch and dispatch reasons come from
    ``Predictor.stats()`` over the measured window.
``inferkit no-op model``
    inferkit around a function that returns its input: process CPU per request is
    what inferkit itself costs (the 32 client threads' own loop included). Its
    note gives the process's context switches per request: nearly every request
    runs alone on its caller's thread here, so they stay near 0 unless callers
    block on the batcher's lock (0.22-0.29 when one could be switched out holding
    it, 0.03 since).
``inferkit 1-row apredict``
    32 asyncio tasks on one event loop awaiting ``Predictor.apredict``, closed
    loop; its note gives its throughput as a share of ``inferkit 1-row``'s 32 threads.
``inferkit 1-row, 16`` / ``inferkit 1-row apredict, 16``
    The same pair with 16 threads and 16 tasks: 32 tasks fill half of
    ``max_batch_size`` exactly, which the wide session rewards, so the pair at
    another count shows what a typical event loop gets.
``latency ...``
    One client (concurrency 1), 1-row requests: ``session.run`` directly (intra-op
    1 and 2, the lower p50 is shown) against ``Predictor.predict`` with
    ``max_delay_ms=0`` and that same intra-op setting, so the difference, noted
    as "added p50", is what inferkit's queueing and hand-off cost per request.
    Then the same with nothing set on either side: ``session.run`` on ONNX
    Runtime's defaults against ``Predictor.from_onnx(model)`` on inferkit's.
    Then both on one intra-op thread: neither session has a pool thread spinning
    on a core the other needs, so this pair repeats (two identical sessions
    measured so differ by under 1 µs, against up to 15 µs with 2 threads each):
    it is the row for inferkit's added latency (target <= 10 µs).
    The two sides of each pair alternate in blocks of 50 calls on one thread
    over one window, so the machine's drift between cells stays out of "added".

For ``direct``, ``naive``, ``batched`` and ``lean`` both ``intra_op_num_threads=1`` and
``2`` are run; the table shows the better one (column ``ORT intra_op``) and the notes
give the other, so no row loses to a bad ORT setting.

How each cell is timed
----------------------
Clients start together and run ``--warmup`` seconds unmeasured, then the
measured window opens. It closes after ``--seconds`` or once
``--max-requests`` requests have finished in it, whichever comes first. Only
requests that finish inside the window count: ``rows/s`` is their rows divided
by the window length, and p50/p99 are their latencies (one request, measured by
its own client with ``time.perf_counter()``).

On a noisy machine, ``--rounds N`` runs the whole selection N times, row after
row, so that a burst of outside load hits one round rather than one row; each
row then reports its median round with the range in the notes.

How to read it
--------------
``share`` is rows/s divided by ``limit``: how much of the model's batched
throughput a serving strategy delivers to 32 concurrent callers. A batcher
above ``direct`` is buying throughput with batching; one close to ``limit`` is
leaving nothing on the table. Latency under load (p50/p99 of the loaded rows)
includes the time spent waiting for a batch to fill.

Two things to keep in mind. With 32 closed-loop clients sending one row each,
at most 32 rows are ever waiting, so a 64-row batch can never fill: a batcher
that only dispatches on "full or timer" waits out its whole 2 ms for every batch
(mean batch 32, p50 of about 2 ms + one batch). And ``limit`` is measured at
batch 64 and 256 only; smaller batches can be a little faster per row on some
CPUs, so a share slightly above 100% is possible and not an error.

On a small shared machine (this was written for 2 busy cores) runs have varied
by up to +-30%; compare rows within one run, not across runs, check the load
average printed above the table, and prefer ``--rounds 3``.

Run ``python benchmarks/bench_batching.py`` (``--quick`` for 1 s cells,
``--rounds 3`` for medians, ``--only naive,inferkit-1`` for a subset; ``limit``
is added whenever a throughput row is selected, since ``share`` needs it).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import itertools
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from lean_batcher import LeanBatcher
from models import INPUT_DIM, OUTPUT_DIM, mlp_bytes
from naive_batcher import NaiveBatcher

FloatArray = npt.NDArray[np.float32]
Call = Callable[[FloatArray], object]

CLIENTS = 32
MAX_BATCH = 64
MAX_DELAY_MS = 2.0
INTRA_CHOICES = (1, 2)
LIMIT_BATCHES = (64, 256)
DRIFT_WARNING = 0.15
JOIN_TIMEOUT_S = 30.0
PAIRED_BLOCK = 50  # calls in a row on one side of a paired latency cell

ROW_NAMES = (
    "limit",
    "direct",
    "naive",
    "batched",
    "lean-1",
    "lean-8",
    "inferkit-1",
    "inferkit-8",
    "inferkit-8-intra2",
    "inferkit-shared2",
    "inferkit-rr",
    "inferkit-noop",
    "inferkit-async",
    "inferkit-async16",
    "latency",
)
THROUGHPUT_ROWS = frozenset(ROW_NAMES) - {"limit", "latency"}


# --------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class CellResult:
    """What one measured cell produced."""

    rows_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int
    window_s: float
    cpu_us: float | None = None  # process CPU (every thread: clients, batcher, model) per request
    switches: float | None = None  # the process's context switches per request (Unix)


@dataclass(frozen=True)
class CellConfig:
    """How long and how much every cell runs."""

    seconds: float
    warmup: float
    max_requests: int


def run_closed_loop(
    call: Call,
    inputs: list[FloatArray],
    cfg: CellConfig,
    *,
    on_window: Callable[[str], None] | None = None,
) -> CellResult:
    """Run ``len(inputs)`` closed-loop clients; client ``i`` sends ``inputs[i]``.

    ``on_window("start")`` / ``on_window("end")`` are called from the main thread
    when the measured window opens and closes (used to snapshot batcher stats).
    """
    clients = len(inputs)
    stop = threading.Event()
    counted = itertools.count()  # next() on a count is atomic under the GIL
    stop_times: list[float] = []
    errors: list[BaseException] = []
    per_client: list[tuple[list[float], list[float]]] = [([], []) for _ in range(clients)]
    ready = threading.Barrier(clients + 1)
    window: list[float] = []  # [start], written by the main thread before release

    def client(i: int) -> None:
        x = inputs[i]
        starts, ends = per_client[i]
        ready.wait()
        window_start = window[0]
        try:
            while not stop.is_set():
                t0 = time.perf_counter()
                call(x)
                t1 = time.perf_counter()
                starts.append(t0)
                ends.append(t1)
                if t1 >= window_start and next(counted) + 1 >= cfg.max_requests:
                    stop_times.append(t1)
                    stop.set()
        except BaseException as exc:
            errors.append(exc)
            stop.set()

    threads = [threading.Thread(target=client, args=(i,), name=f"client-{i}", daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    window.append(time.perf_counter() + cfg.warmup)
    ready.wait()
    window_start = window[0]
    _sleep_until(window_start, stop)
    if on_window is not None and not stop.is_set():
        on_window("start")
    cpu_start, switches_start = time.process_time(), _switches()
    done_at_start = next(counted)
    stop.wait(max(0.0, window_start + cfg.seconds - time.perf_counter()))
    stop_times.append(time.perf_counter())
    cpu_window, switches_window = time.process_time() - cpu_start, _switches() - switches_start
    done_in_cpu_window = next(counted) - done_at_start - 1
    stop.set()
    if on_window is not None:
        on_window("end")
    join_by = time.perf_counter() + JOIN_TIMEOUT_S
    for t in threads:
        t.join(max(0.0, join_by - time.perf_counter()))
    if any(t.is_alive() for t in threads):
        raise RuntimeError(f"a client is still waiting for its answer {JOIN_TIMEOUT_S:g} s after the window closed")
    if errors:
        raise RuntimeError(f"a client failed: {errors[0]!r}") from errors[0]

    window_end = min(stop_times)
    rows_per_request = [len(x) for x in inputs]
    latencies: list[float] = []
    rows = 0
    for (starts, ends), n_rows in zip(per_client, rows_per_request, strict=True):
        for t0, t1 in zip(starts, ends, strict=True):
            if window_start <= t1 <= window_end:
                latencies.append(t1 - t0)
                rows += n_rows
    cpu_us = cpu_window / done_in_cpu_window * 1e6 if done_in_cpu_window > 0 else None
    result = cell_result(latencies, rows, window_end - window_start, cpu_us)
    if done_in_cpu_window > 0 and switches_start >= 0:
        result = replace(result, switches=switches_window / done_in_cpu_window)
    return result


def _switches() -> int:
    """The process's context switches so far, every thread's (-1 where ``resource`` is missing: not Unix)."""
    try:
        import resource
    except ImportError:
        return -1
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_nvcsw + usage.ru_nivcsw


def paired_loop(calls: list[Call], x: FloatArray, cfg: CellConfig) -> list[CellResult]:
    """One caller alternating ``calls`` in blocks of :data:`PAIRED_BLOCK` calls: a result for each.

    Side by side in one window, so the machine's drift between cells (10-35% here) does not
    enter their difference. Each call's ``--warmup`` is run first, in turn, unmeasured.
    """
    lat: list[list[float]] = [[] for _ in calls]
    cpu = [0.0 for _ in calls]
    for call in calls:
        until = time.perf_counter() + cfg.warmup / len(calls)
        while time.perf_counter() < until:
            call(x)
    start = time.perf_counter()
    end = start + cfg.seconds
    while time.perf_counter() < end and sum(map(len, lat)) < cfg.max_requests:
        for i, call in enumerate(calls):
            times = lat[i]
            c0 = time.process_time()
            for _ in range(PAIRED_BLOCK):
                t0 = time.perf_counter()
                call(x)
                times.append(time.perf_counter() - t0)
            cpu[i] += time.process_time() - c0
    span = time.perf_counter() - start
    return [
        cell_result(times, len(times), span * len(times) / sum(map(len, lat)), c / len(times) * 1e6)
        for times, c in zip(lat, cpu, strict=True)
    ]


def cell_result(latencies: list[float], rows: int, span: float, cpu_us: float | None) -> CellResult:
    """A cell's figures from the latencies (seconds) of the requests that finished in its window."""
    if not latencies:
        raise RuntimeError("no request finished inside the measured window")
    lat = np.asarray(latencies) * 1000.0
    return CellResult(
        rows_per_s=rows / span,
        p50_ms=float(np.percentile(lat, 50)),
        p99_ms=float(np.percentile(lat, 99)),
        requests=len(latencies),
        window_s=span,
        cpu_us=cpu_us,
    )


async def async_closed_loop(
    call: Callable[[FloatArray], Awaitable[object]],
    inputs: list[FloatArray],
    cfg: CellConfig,
    on_window: Callable[[str], None] | None = None,
) -> CellResult:
    """:func:`run_closed_loop` for coroutines: ``len(inputs)`` tasks on the running event loop."""
    loop = asyncio.get_running_loop()
    window_start = loop.time() + cfg.warmup
    window_end = window_start + cfg.seconds
    latencies: list[float] = []
    last: list[float] = [window_end]
    cpu: list[float] = []

    async def client(x: FloatArray) -> None:
        while (now := loop.time()) < window_end and len(latencies) < cfg.max_requests:
            await call(x)
            end = loop.time()
            if window_start <= end <= window_end:
                latencies.append(end - now)
                if len(latencies) >= cfg.max_requests:
                    last[0] = end

    async def clock() -> None:
        await asyncio.sleep(max(0.0, window_start - loop.time()))
        cpu.append(time.process_time())
        if on_window is not None:
            on_window("start")
        await asyncio.sleep(max(0.0, window_end - loop.time()))
        cpu.append(time.process_time())
        if on_window is not None:
            on_window("end")

    await asyncio.gather(clock(), *(client(x) for x in inputs))
    cpu_us = (cpu[1] - cpu[0]) / len(latencies) * 1e6 if len(cpu) == 2 and latencies else None
    return cell_result(latencies, len(latencies) * len(inputs[0]), last[0] - window_start, cpu_us)


def _sleep_until(deadline: float, stop: threading.Event) -> None:
    remaining = deadline - time.perf_counter()
    if remaining > 0:
        stop.wait(remaining)


# --------------------------------------------------------------------------- setup


def make_session(model: bytes, intra: int, *, spin: bool = True) -> ort.InferenceSession:
    """A CPU session with the given intra-op threads and one inter-op thread; ``spin=False``: its threads never spin."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = intra
    so.inter_op_num_threads = 1
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def client_inputs(rows: int, clients: int = CLIENTS, seed: int = 1) -> list[FloatArray]:
    """One distinct ``(rows, INPUT_DIM)`` float32 array per client."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((rows, INPUT_DIM), dtype=np.float32) for _ in range(clients)]


def check_outputs(call: Callable[[FloatArray], FloatArray], session: ort.InferenceSession, rows: int) -> None:
    """Fail loudly if a serving path returns anything but the model's output."""
    x = client_inputs(rows, clients=1, seed=7)[0]
    want: FloatArray = session.run(None, {session.get_inputs()[0].name: x})[0]
    got = np.asarray(call(x))
    if got.shape != (rows, OUTPUT_DIM) or not np.allclose(got, want, rtol=1e-4, atol=1e-4):
        raise AssertionError(f"wrong output: shape {got.shape}, want {want.shape}")


def session_call(session: ort.InferenceSession) -> Callable[[FloatArray], FloatArray]:
    name = session.get_inputs()[0].name

    def call(x: FloatArray) -> FloatArray:
        out: FloatArray = session.run(None, {name: x})[0]
        return out

    return call


def mean_batch_from(sizes_before: Mapping[int, int], sizes_after: Mapping[int, int]) -> float:
    """Mean rows per batch between two ``{rows: count}`` snapshots."""
    delta = {k: v - sizes_before.get(k, 0) for k, v in sizes_after.items()}
    batches = sum(delta.values())
    return sum(k * v for k, v in delta.items()) / batches if batches else float("nan")


def _pct(part: int, total: int) -> str:
    share = 100 * part / total
    return f"{share:.0f}%" if share >= 1 else "<1%"


def _fmt_reasons(before: Mapping[str, int], after: Mapping[str, int]) -> str:
    delta = {str(k): v - before.get(k, 0) for k, v in after.items()}
    total = sum(delta.values())
    if not total:
        return ""
    parts = [f"{k} {_pct(v, total)}" for k, v in sorted(delta.items()) if v]
    return "dispatch: " + ", ".join(parts)


# --------------------------------------------------------------------------- rows


@dataclass
class Row:
    """One line of the table."""

    name: str
    load: str
    intra: str
    result: CellResult | None = None
    mean_batch: float | None = None
    notes: list[str] = field(default_factory=list)
    throughput: bool = True
    model_alone: dict[tuple[int, int], float] = field(default_factory=dict)  # limit row: rows/s by (batch, intra)


@dataclass
class Bench:
    """Measures rows: the model and the budget of every cell."""

    model: bytes
    cfg: CellConfig

    def log(self, msg: str) -> None:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)

    # ---- limit

    def _limit_cell(self, batch: int, intra: int) -> CellResult:
        self.log(f"limit: batch {batch}, intra {intra}")
        call = session_call(make_session(self.model, intra))
        return run_closed_loop(call, client_inputs(batch, clients=1), self.cfg)

    def limit(self) -> Row:
        trials = [(self._limit_cell(batch, intra), batch, intra) for intra in INTRA_CHOICES for batch in LIMIT_BATCHES]
        best, batch, intra = max(trials, key=lambda t: t[0].rows_per_s)
        row = Row("limit", f"1 x {batch}", str(intra), best)
        row.notes.append("p50/p99 per batch call")
        others = [f"{b}/{i} {r.rows_per_s:,.0f}" for r, b, i in trials if r is not best]
        row.notes.append("others (batch/intra rows/s): " + ", ".join(others))
        row.model_alone = {(b, i): r.rows_per_s for r, b, i in trials}
        return row

    def recheck_limit(self, row: Row) -> float:
        """Measure the best ``limit`` setting again; keep the better; return drift.

        Other programs on a small machine can take a core for seconds at a time;
        a large drift between the first and the last limit cell says the shares
        in between are not trustworthy.
        """
        first = row.result
        assert first is not None
        batch = int(row.load.split(" x ")[1])
        again = self._limit_cell(batch, int(row.intra))
        row.notes.append(f"first {first.rows_per_s:,.0f}, again at the end {again.rows_per_s:,.0f} rows/s")
        if again.rows_per_s > first.rows_per_s:
            row.result = again
        return _spread([first.rows_per_s, again.rows_per_s])

    # ---- baselines at intra 1 and 2

    def _best_of_intra(
        self,
        name: str,
        load: str,
        measure: Callable[[int], tuple[CellResult, float | None]],
    ) -> Row:
        trials: list[tuple[CellResult, float | None, int]] = []
        for intra in INTRA_CHOICES:
            self.log(f"{name}: intra {intra}")
            res, mean_batch = measure(intra)
            trials.append((res, mean_batch, intra))
        best, mean_batch, intra = max(trials, key=lambda t: t[0].rows_per_s)
        row = Row(name, load, f"{intra} (best of 1,2)", best, mean_batch)
        for res, _, other in trials:
            if res is not best:
                rate = f"{res.rows_per_s:,.0f} rows/s"
                row.notes.append(f"intra {other}: {rate}, p99 {res.p99_ms:.2f} ms")
        return row

    def direct(self) -> Row:
        def measure(intra: int) -> tuple[CellResult, float | None]:
            session = make_session(self.model, intra)
            return run_closed_loop(session_call(session), client_inputs(1), self.cfg), None

        return self._best_of_intra("direct 32 thr", f"{CLIENTS} x 1", measure)

    def naive(self) -> Row:
        def measure(intra: int) -> tuple[CellResult, float | None]:
            session = make_session(self.model, intra)
            with NaiveBatcher(session, max_items=MAX_BATCH, max_delay_ms=MAX_DELAY_MS) as nb:
                check_outputs(nb.predict, session, 1)
                snap: dict[str, tuple[int, int]] = {}

                def on_window(when: str) -> None:
                    snap[when] = (nb.batches, nb.rows)

                res = run_closed_loop(nb.predict, client_inputs(1), self.cfg, on_window=on_window)
            return res, _mean_from_totals(snap)

        return self._best_of_intra("naive batcher", f"{CLIENTS} x 1", measure)

    def batched(self) -> Row:
        try:
            batched_mod: Any = importlib.import_module("batched")
        except ImportError:
            row = Row("batched (PyPI)", f"{CLIENTS} x 1", "-", throughput=True)
            row.notes.append("skipped: `batched` is not installed (pip install batched)")
            return row
        version = _dist_version("batched")

        def measure(intra: int) -> tuple[CellResult, float | None]:
            session = make_session(self.model, intra)
            run_batch = session_call(session)

            def infer(items: list[FloatArray]) -> list[FloatArray]:
                return list(run_batch(np.stack(items)))

            processor = batched_mod.dynamically(infer, batch_size=MAX_BATCH, timeout_ms=MAX_DELAY_MS)

            def call(x: FloatArray) -> FloatArray:
                # one item = one 1-D row; the processor stacks items into a batch
                out: FloatArray = processor(x[0])[np.newaxis]
                return out

            try:
                check_outputs(call, session, 1)
                snap: dict[str, tuple[int, int]] = {}

                def on_window(when: str) -> None:
                    st = processor.stats
                    snap[when] = (st.total_batches, st.total_processed)

                res = run_closed_loop(call, client_inputs(1), self.cfg, on_window=on_window)
            finally:
                processor.shutdown()
            return res, _mean_from_totals(snap)

        row = self._best_of_intra("batched (PyPI)", f"{CLIENTS} x 1", measure)
        row.notes.insert(0, f"batched {version}, dynamically(batch_size=64, timeout_ms=2)")
        return row

    def lean(self, rows_per_request: int) -> Row:
        def measure(intra: int) -> tuple[CellResult, float | None]:
            session = make_session(self.model, intra, spin=False)
            with LeanBatcher(session, max_rows=MAX_BATCH) as lb:
                check_outputs(lb.predict, session, rows_per_request)
                snap: dict[str, tuple[int, int]] = {}

                def on_window(when: str) -> None:
                    snap[when] = (lb.batches, lb.rows)

                res = run_closed_loop(lb.predict, client_inputs(rows_per_request), self.cfg, on_window=on_window)
            return res, _mean_from_totals(snap)

        name = f"lean batcher {rows_per_request}-row"
        return self._best_of_intra(name, f"{CLIENTS} x {rows_per_request}", measure)

    # ---- inferkit

    def inferkit(
        self,
        name: str,
        rows_per_request: int,
        *,
        replicas: int = 1,
        balancing: str = "shared",
        intra: int | None = None,
        clients: int = CLIENTS,
    ) -> Row:
        load = f"{clients} x {rows_per_request}"
        try:
            import inferkit

            predictor_cls: Any = inferkit.Predictor
        except (ImportError, AttributeError) as exc:
            row = Row(name, load, "inferkit default")
            row.notes.append(f"skipped: inferkit.Predictor unavailable ({exc})")
            return row
        self.log(f"{name}: replicas {replicas}, balancing {balancing}")
        session = make_session(self.model, 1)  # reference outputs only
        with predictor_cls.from_onnx(
            self.model,
            max_batch_size=MAX_BATCH,
            max_delay_ms=MAX_DELAY_MS,
            replicas=replicas,
            balancing=balancing,
            intra_op_threads=intra,
        ) as predictor:
            check_outputs(predictor.predict, session, rows_per_request)
            snaps: dict[str, Any] = {}

            def on_window(when: str) -> None:
                s = predictor.stats()
                snaps[when] = (dict(s.batch_sizes), dict(s.dispatch_reasons))

            res = run_closed_loop(
                predictor.predict,
                client_inputs(rows_per_request, clients=clients),
                self.cfg,
                on_window=on_window,
            )
        row = Row(name, load, _inferkit_intra_label(replicas) if intra is None else str(intra), res)
        if "start" in snaps and "end" in snaps:
            (sizes0, reasons0), (sizes1, reasons1) = snaps["start"], snaps["end"]
            row.mean_batch = mean_batch_from(sizes0, sizes1)
            reasons = _fmt_reasons(reasons0, reasons1)
            if reasons:
                row.notes.append(reasons)
        if replicas > 1:
            row.notes.append(f"replicas={replicas}, balancing={balancing!r}")
        return row

    def noop(self) -> Row:
        """inferkit around a function that returns its input: the CPU per request spent outside any model."""
        import inferkit

        load = f"{CLIENTS} x 1"
        self.log("inferkit no-op model")
        with inferkit.Predictor.from_callable(lambda x: x, max_batch_size=MAX_BATCH, max_delay_ms=MAX_DELAY_MS) as p:
            res = run_closed_loop(p.predict, client_inputs(1), self.cfg)
        row = Row("inferkit no-op model", load, "-", res, throughput=False)
        row.notes.append("CPU µs/req here is inferkit's own cost per request (target <= 10)")
        if res.switches is not None:  # a caller switched out holding the batcher's lock shows here first
            row.notes.append(f"{res.switches:.2f} context switches per request")
        return row

    def inferkit_async(self, name: str = "inferkit 1-row apredict", clients: int = CLIENTS) -> Row:
        """``clients`` asyncio tasks on one event loop awaiting ``apredict`` (1 row each), closed loop."""
        import inferkit

        load = f"{clients} tasks x 1"
        self.log(f"{name}, {clients} asyncio tasks")
        sizes: dict[str, dict[int, int]] = {}
        with inferkit.Predictor.from_onnx(self.model, max_batch_size=MAX_BATCH, max_delay_ms=MAX_DELAY_MS) as p:

            def on_window(when: str) -> None:
                sizes[when] = dict(p.stats().batch_sizes)

            res = asyncio.run(async_closed_loop(p.apredict, client_inputs(1, clients=clients), self.cfg, on_window))
        row = Row(name, load, _inferkit_intra_label(1), res)
        if "start" in sizes and "end" in sizes:
            row.mean_batch = mean_batch_from(sizes["start"], sizes["end"])
        return row

    # ---- latency at concurrency 1

    def latency(self) -> list[Row]:
        x = client_inputs(1, clients=1)[0]
        self.log("latency: direct session.run, intra 1 and 2")
        sessions = {intra: make_session(self.model, intra) for intra in INTRA_CHOICES}
        measured = paired_loop([session_call(s) for s in sessions.values()], x, self.cfg)
        direct = dict(zip(INTRA_CHOICES, measured, strict=True))
        intra = min(direct, key=lambda i: direct[i].p50_ms)
        others = [f"intra {i}: p50 {r.p50_ms * 1000:.0f} µs" for i, r in direct.items() if i != intra]

        name = "latency: inferkit predict"
        try:
            import inferkit

            predictor_cls: Any = inferkit.Predictor
        except (ImportError, AttributeError) as exc:
            row = Row(name, "1 x 1", str(intra), throughput=False)
            row.notes.append(f"skipped: inferkit.Predictor unavailable ({exc})")
            best = Row("latency: session.run", "1 x 1", f"{intra} (best p50 of 1,2)", direct[intra], throughput=False)
            return [best, row]
        self.log(f"latency: session.run and inferkit predict (max_delay_ms=0), intra {intra}, alternated")
        with predictor_cls.from_onnx(
            self.model,
            max_batch_size=MAX_BATCH,
            max_delay_ms=0.0,
            replicas=1,
            balancing="shared",
            intra_op_threads=intra,
        ) as predictor:
            plain, ours = paired_loop([session_call(sessions[intra]), predictor.predict], x, self.cfg)
        d_row = Row("latency: session.run", "1 x 1", f"{intra} (best p50 of 1,2)", plain, throughput=False)
        d_row.notes.extend(others)
        row = Row(name, "1 x 1", str(intra), ours, throughput=False)
        row.notes.append("max_delay_ms=0")
        rows = [d_row, row]

        # The repeatable pair: with one intra-op thread neither session has a pool thread that
        # spins on a core the other needs, so the difference is inferkit's alone.
        self.log("latency: session.run and inferkit predict (max_delay_ms=0), intra 1, alternated")
        with predictor_cls.from_onnx(
            self.model, max_batch_size=MAX_BATCH, max_delay_ms=0.0, replicas=1, intra_op_threads=1
        ) as predictor:
            plain, ours = paired_loop([session_call(sessions[1]), predictor.predict], x, self.cfg)
        rows.append(Row("latency: session.run, intra 1", "1 x 1", "1", plain, throughput=False))
        rows.append(Row("latency: inferkit predict, intra 1", "1 x 1", "1", ours, throughput=False))

        # What a user who changes nothing sees: ONNX Runtime's defaults against inferkit's.
        self.log("latency: session.run and inferkit predict, both with their defaults, alternated")
        session = ort.InferenceSession(self.model, providers=["CPUExecutionProvider"])
        with predictor_cls.from_onnx(self.model) as predictor:
            plain, ours = paired_loop([session_call(session), predictor.predict], x, self.cfg)
        rows.append(Row("latency: session.run, ORT defaults", "1 x 1", "ORT default", plain, throughput=False))
        rows.append(Row("latency: inferkit predict, defaults", "1 x 1", "inferkit default", ours, throughput=False))
        return rows


def combine_rounds(rounds: list[list[Row]]) -> list[Row]:
    """One row per name across rounds: the round with the median result.

    Throughput rows (``limit`` included) take the round with the median rows/s,
    latency rows the round with the median p50; the picked round's numbers stay
    together (no mixing of one round's rows/s with another's p99).
    """
    if len(rounds) == 1:
        return rounds[0]
    combined: list[Row] = []
    for candidates in zip(*rounds, strict=True):
        measured = [r for r in candidates if r.result is not None]
        if not measured:
            combined.append(candidates[0])
            continue
        rates = sorted(r.result.rows_per_s for r in measured if r.result is not None)
        if candidates[0].throughput:
            pick = sorted(measured, key=_rate)[(len(measured) - 1) // 2]
            note = f"median of {len(measured)} rounds ({rates[0]:,.0f}-{rates[-1]:,.0f} rows/s)"
        else:
            pick = sorted(measured, key=_p50)[(len(measured) - 1) // 2]
            p50s = sorted(_p50(r) * 1000 for r in measured)
            note = f"median p50 of {len(measured)} rounds ({p50s[0]:.0f}-{p50s[-1]:.0f} µs)"
        pick.notes.insert(0, note)
        combined.append(pick)
    return combined


def add_round_shares(rounds: list[list[Row]], rows: list[Row]) -> None:
    """Note on each throughput row its share of the limit measured in the same round, per round.

    The limit moves 10% and more between rounds on a shared machine; a row set against the
    limit of its own round (cells seconds apart) moves less than one set against the median.
    """
    if len(rounds) < 2:
        return
    by_name = {r.name: r for r in rows}
    for k, first in enumerate(rounds[0]):
        row = by_name.get(first.name)
        if row is None or not first.throughput or first.name == "limit":
            continue
        shares = []
        for rs in rounds:
            limit = next((r for r in rs if r.name == "limit"), None)
            if limit is not None and _rate(limit) > 0 and rs[k].result is not None:
                shares.append(_rate(rs[k]) / _rate(limit))
        if len(shares) == len(rounds):
            each = ", ".join(f"{100 * s:.0f}%" for s in shares)
            row.notes.append(f"share of its round's limit {each} (median {100 * statistics.median(shares):.0f}%)")


def _spread(values: list[float]) -> float:
    return (max(values) - min(values)) / max(values) if values and max(values) > 0 else 0.0


def _rate(row: Row) -> float:
    return row.result.rows_per_s if row.result is not None else 0.0


def _p50(row: Row) -> float:
    return row.result.p50_ms if row.result is not None else float("inf")


ASYNC_PAIRS = (("inferkit 1-row", "inferkit 1-row apredict"), ("inferkit 1-row, 16", "inferkit 1-row apredict, 16"))


def add_async_ratio(rows: list[Row]) -> None:
    """Note on each asyncio row its throughput as a share of as many threads calling ``predict``."""
    by_name = {r.name: r for r in rows}
    for threads_name, tasks_name in ASYNC_PAIRS:
        threads, tasks = by_name.get(threads_name), by_name.get(tasks_name)
        if threads and tasks and threads.result and tasks.result:
            ratio = tasks.result.rows_per_s / threads.result.rows_per_s
            tasks.notes.append(f"{ratio:.2f}x as many threads calling predict (target >= 0.95)")


def add_lean_ratio(rows: list[Row]) -> None:
    """Note on inferkit's 1-row and 8-row rows their throughput as a share of the lean batcher's."""
    by_name = {r.name: r for r in rows}
    for n in (1, 8):
        ours, lean = by_name.get(f"inferkit {n}-row"), by_name.get(f"lean batcher {n}-row")
        if ours and lean and ours.result and lean.result:
            ours.notes.append(f"{ours.result.rows_per_s / lean.result.rows_per_s:.2f}x the lean batcher")


def add_model_ratio(rows: list[Row], narrow: int, wide: int) -> None:
    """Note on inferkit's 1-row and 8-row rows their throughput against the model alone (the limit row's cells)
    at a full batch on the threads inferkit's session has there: ``narrow`` for 1-row batches, ``wide`` for
    full 8-row ones. What any batcher could reach with those sessions, were the callers free."""
    by_name = {r.name: r for r in rows}
    limit = by_name.get("limit")
    if limit is None:
        return
    for n, intra in ((1, narrow), (8, wide)):
        ours, alone = by_name.get(f"inferkit {n}-row"), limit.model_alone.get((MAX_BATCH, intra))
        if ours and ours.result and alone:
            ratio = ours.result.rows_per_s / alone
            ours.notes.append(f"{ratio:.2f}x the model alone at batch {MAX_BATCH}, intra {intra}")


def add_latency_delta(rows: list[Row]) -> None:
    """Note on inferkit's latency rows how much p50 they add over ``session.run``."""
    by_name = {r.name: r for r in rows}
    for direct_name, ours_name in (
        ("latency: session.run", "latency: inferkit predict"),
        ("latency: session.run, ORT defaults", "latency: inferkit predict, defaults"),
        ("latency: session.run, intra 1", "latency: inferkit predict, intra 1"),
    ):
        direct, ours = by_name.get(direct_name), by_name.get(ours_name)
        if direct and ours and direct.result and ours.result:
            added_us = (ours.result.p50_ms - direct.result.p50_ms) * 1000.0
            ours.notes.append(f"added p50 {added_us:+.1f} µs vs {direct_name.removeprefix('latency: ')}")


def _inferkit_intra_label(replicas: int) -> str:
    """``"default (=N)"`` when inferkit's default can be read, else ``"default"``."""
    try:
        from inferkit.backends.onnx import default_intra_op_threads
    except ImportError:
        return "inferkit default"
    return f"inferkit default (={default_intra_op_threads(replicas)})"


def _inferkit_threads() -> tuple[int, int]:
    """Intra-op threads of inferkit's narrow and wide sessions for one replica; (0, 0) when they cannot be read."""
    try:
        from inferkit.backends.onnx import default_intra_op_threads, default_wide_threads
    except ImportError:
        return 0, 0
    return default_intra_op_threads(1), default_wide_threads(1)


def _mean_from_totals(snap: Mapping[str, tuple[int, int]]) -> float | None:
    if "start" not in snap or "end" not in snap:
        return None
    batches = snap["end"][0] - snap["start"][0]
    rows = snap["end"][1] - snap["start"][1]
    return rows / batches if batches else None


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _dist_version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


# --------------------------------------------------------------------------- output


def render(rows: list[Row], limit: float | None) -> str:
    header = (
        "| row | clients x rows/req | ORT intra_op | rows/s | share of limit | p50 ms | p99 ms | CPU µs/req "
        "| mean batch | notes |"
    )
    lines = [header, "|" + "---|" * 10]
    for r in rows:
        res = r.result
        if res is None:
            cells = ["-"] * 5
        else:
            share = f"{100 * res.rows_per_s / limit:.0f}%" if limit and r.throughput else "-"
            cells = [
                f"{res.rows_per_s:,.0f}",
                share,
                f"{res.p50_ms:.3f}",
                f"{res.p99_ms:.3f}",
                "-" if res.cpu_us is None else f"{res.cpu_us:.1f}",
            ]
        mean_batch = "-" if r.mean_batch is None else f"{r.mean_batch:.1f}"
        notes = "; ".join(r.notes)
        fields = [r.name, r.load, r.intra, *cells, mean_batch, notes]
        lines.append("| " + " | ".join(fields) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="measured seconds per cell (default 3, or 1 with --quick)",
    )
    parser.add_argument("--quick", action="store_true", help="1 s cells, shorter warm-up")
    parser.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="unmeasured seconds before each cell (default 0.5, quick 0.25)",
    )
    parser.add_argument(
        "--max-requests",
        type=int,
        default=500_000,
        help="a cell also ends after this many measured requests",
    )
    parser.add_argument(
        "--only",
        action="append",
        default=None,
        metavar="NAME[,NAME]",
        help=f"run only these rows: {', '.join(ROW_NAMES)}",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every selected row this many times, interleaved, and report the median round",
    )
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.seconds is None:
        args.seconds = 1.0 if args.quick else 3.0
    if args.warmup is None:
        args.warmup = 0.25 if args.quick else 0.5
    selected: tuple[str, ...] = ROW_NAMES
    if args.only:
        wanted = {n.strip() for item in args.only for n in item.split(",") if n.strip()}
        unknown = wanted - set(ROW_NAMES)
        if unknown:
            parser.error(f"unknown row(s) {sorted(unknown)}; choose from {', '.join(ROW_NAMES)}")
        if wanted & THROUGHPUT_ROWS:
            wanted.add("limit")
        selected = tuple(n for n in ROW_NAMES if n in wanted)
    args.selected = selected
    return args


@contextmanager
def _timed(bench: Bench, name: str) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    bench.log(f"{name} done in {time.perf_counter() - t0:.1f} s")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = CellConfig(seconds=args.seconds, warmup=args.warmup, max_requests=args.max_requests)
    bench = Bench(model=mlp_bytes(), cfg=cfg)
    steps: dict[str, Callable[[], list[Row]]] = {
        "limit": lambda: [bench.limit()],
        "direct": lambda: [bench.direct()],
        "naive": lambda: [bench.naive()],
        "batched": lambda: [bench.batched()],
        "lean-1": lambda: [bench.lean(1)],
        "lean-8": lambda: [bench.lean(8)],
        "inferkit-1": lambda: [bench.inferkit("inferkit 1-row", 1)],
        "inferkit-8": lambda: [bench.inferkit("inferkit 8-row", 8)],
        "inferkit-8-intra2": lambda: [bench.inferkit("inferkit 8-row intra 2", 8, intra=2)],
        "inferkit-shared2": lambda: [bench.inferkit("inferkit 1-row shared r2", 1, replicas=2, balancing="shared")],
        "inferkit-rr": lambda: [bench.inferkit("inferkit 1-row rr", 1, replicas=2, balancing="round_robin")],
        "inferkit-noop": lambda: [bench.noop()],
        "inferkit-async": lambda: [bench.inferkit_async()],
        "inferkit-async16": lambda: [
            bench.inferkit("inferkit 1-row, 16", 1, clients=16),
            bench.inferkit_async("inferkit 1-row apredict, 16", clients=16),
        ],
        "latency": bench.latency,
    }
    load_before = os.getloadavg()[0]
    rounds: list[list[Row]] = []
    for k in range(args.rounds):
        round_rows: list[Row] = []
        for name in args.selected:
            with _timed(bench, f"round {k + 1}/{args.rounds}: {name}"):
                round_rows.extend(steps[name]())
        rounds.append(round_rows)
    rows = combine_rounds(rounds)
    add_round_shares(rounds, rows)
    add_latency_delta(rows)
    add_async_ratio(rows)
    add_lean_ratio(rows)
    add_model_ratio(rows, *_inferkit_threads())
    limit_row = next((r for r in rows if r.name == "limit"), None)
    limit: float | None = None
    drift: float | None = None
    if limit_row is not None and limit_row.result is not None:
        if args.rounds > 1:
            drift = _spread([_rate(r) for rs in rounds for r in rs if r.name == "limit"])
        elif len(args.selected) > 1:
            drift = bench.recheck_limit(limit_row)
        limit = limit_row.result.rows_per_s
    load_after = os.getloadavg()[0]

    switch_ms = sys.getswitchinterval() * 1000
    print(
        f"MLP {INPUT_DIM}->1024->1024->{OUTPUT_DIM} float32 | "
        f"onnxruntime {ort.__version__}, numpy {np.__version__}, "
        f"Python {platform.python_version()} | {_cpus()} CPUs | "
        f"GIL switch interval {switch_ms:g} ms"
    )
    print(
        f"cells: {cfg.seconds:g} s measured after {cfg.warmup:g} s warm-up, "
        f"{args.rounds} round(s), "
        f"≤ {cfg.max_requests:,} requests | batchers: max batch {MAX_BATCH}, "
        f"max delay {MAX_DELAY_MS:g} ms | inter_op_num_threads=1 everywhere"
    )
    print(
        f"load average (1 min) {load_before:.2f} before, {load_after:.2f} after; "
        + ("limit = the median round" if args.rounds > 1 else "limit = the better of its first and last cell")
    )
    print()
    print(render(rows, limit))
    if drift is not None and drift > DRIFT_WARNING:
        print(
            f"\nWARNING: limit moved {100 * drift:.0f}% during the run (first vs last, or across "
            "rounds); the machine was busy, so shares are unreliable. Rerun."
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
