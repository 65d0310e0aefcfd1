"""Deterministic cost of a request's path through inferkit: Python bytecodes per request.

Times on these machines move 10-35% between runs; the bytecodes a request executes do not. So
this counts them (``sys.settrace`` opcode events, in every thread the request touches) for:

- ``lone``: ``predict`` at concurrency 1 on a no-op function: the caller's own thread runs it;
- ``lone-onnx``: the same on an ONNX Runtime Identity model;
- ``queued``: synchronous callers queued behind a busy replica, then run as one batch by its
  worker: the count per request is the difference between 32 and 16 callers, divided by 16
  (what every batch costs once cancels out);
- ``queued-async``: the same with ``apredict`` tasks on one event loop (asyncio's own Python
  machinery included: it runs per request too);
- ``queued-rr``: ``queued`` with two replicas and a queue each (``round_robin``), each run
  keeping every core busy: every request goes to the busy replica's queue (the crowding rule),
  so the balancer's choice is counted, not a second replica's batches.

For the queued paths the table also gives what of that runs on inferkit's own threads (the
replica's worker): the serial part of a batch, which the model waits out.

Compare two trees with ``PYTHONPATH=<tree> python benchmarks/hot_path.py`` on each.
``--callgrind`` adds valgrind's count of machine instructions per ``lone`` predict (native
work included; only the measured calls are counted, hash seed fixed: it repeats exactly).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
from models import identity_bytes

import inferkit
from inferkit.backends.base import usable_cores

Counts = collections.Counter[tuple[str, str]]
WAIT = 10.0  # seconds: a bound on every wait here, never expected to be reached
CALLGRIND_CALLS = 1000


class Tracer:
    """Counts opcodes per (file, function) while ``on``, in the threads it is installed in.

    ``worker`` holds those run on inferkit's own threads (a replica's worker): the serial part
    of a batch, which the model waits out; ``counts`` holds every thread's.
    """

    def __init__(self) -> None:
        self.on = False
        self.counts: Counts = collections.Counter()
        self.worker: Counts = collections.Counter()

    def __call__(self, frame: FrameType, event: str, _arg: object) -> Any:
        if not self.on:
            return self
        if event == "call":
            frame.f_trace_opcodes = True
            frame.f_trace_lines = False
        elif event == "opcode":
            code = frame.f_code
            key = (Path(code.co_filename).name, code.co_name)
            self.counts[key] += 1
            if threading.current_thread().name.startswith("inferkit-"):
                self.worker[key] += 1
        return self

    def start(self) -> None:
        """Count from now, in the frames inferkit's threads are in already (the worker's loop) too."""
        self.on = True
        names = {t.ident: t.name for t in threading.enumerate()}
        for ident, frame in sys._current_frames().items():
            if names.get(ident, "").startswith("inferkit-"):
                f: FrameType | None = frame
                while f is not None:
                    f.f_trace_opcodes = True
                    f = f.f_back


class Gate:
    """A no-op model whose first row ``-1`` makes its call wait for ``release``."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        if x[0, 0] == -1:
            self.entered.set()
            self.release.wait(WAIT)
        return x


def lone(predictor: inferkit.Predictor, x: np.ndarray[Any, Any]) -> Counts:
    """The opcodes of one ``predict`` at concurrency 1 (after a warm-up)."""
    for _ in range(50):
        predictor.predict(x)
    tracer = Tracer()
    sys.settrace(tracer)
    tracer.on = True
    predictor.predict(x)
    tracer.on = False
    sys.settrace(None)
    return tracer.counts


class _EveryCore(inferkit.CallableBackend):
    """A callable backend whose runs say they keep every core busy (see ``cpu_threads``)."""

    cpu_threads = usable_cores()


def _queued_batch(k: int, *, use_async: bool, balancing: str | None = None) -> Tracer:
    """The opcodes of ``k`` callers queued behind a busy replica and run as one batch, in all threads."""
    tracer = Tracer()
    gate = Gate()
    threading.settrace(tracer)  # the worker thread starts traced
    batching = inferkit.BatchConfig(max_batch_size=64, max_delay_ms=2)
    if balancing is None:
        predictor = inferkit.Predictor.from_callable(gate, batching=batching)
    else:
        pool = inferkit.PoolConfig(replicas=2, balancing=balancing)
        predictor = inferkit.Predictor(lambda: _EveryCore(gate), batching=batching, pool=pool)
    x = np.ones((1, 3))
    try:
        for _ in range(20):
            predictor.predict(x)
        blocker = predictor.submit(np.full((1, 3), -1.0))
        assert gate.entered.wait(WAIT)

        def queued(depth: int) -> bool:
            return predictor.stats().queue_depth >= depth

        if use_async:

            async def main() -> None:
                sys.settrace(tracer)
                tracer.start()
                tasks = [asyncio.ensure_future(predictor.apredict(x)) for _ in range(k)]
                await asyncio.sleep(0)  # one loop turn: each task runs to its await, its request queued
                assert queued(k)
                gate.release.set()
                await asyncio.wait_for(asyncio.gather(*tasks), WAIT)
                tracer.on = False

            asyncio.run(main())
        else:

            def call() -> None:
                sys.settrace(tracer)
                predictor.predict(x)

            callers = [threading.Thread(target=call) for _ in range(k)]
            tracer.start()
            for t in callers:
                t.start()
            deadline = time.monotonic() + WAIT
            while not queued(k) and time.monotonic() < deadline:
                time.sleep(0.001)
            gate.release.set()
            for t in callers:
                t.join(WAIT)
            tracer.on = False
        blocker.result(WAIT)
    finally:
        tracer.on = False
        gate.release.set()
        threading.settrace(None)  # type: ignore[arg-type]
        sys.settrace(None)
        predictor.close(WAIT)
    return tracer


def queued(*, use_async: bool = False, balancing: str | None = None) -> tuple[Counts, Counts]:
    """The opcodes per queued request in all threads and on the worker: 32 callers' batch less 16's, over 16."""
    _queued_batch(4, use_async=use_async, balancing=balancing)  # first uses import and compile: not per request
    small = _queued_batch(16, use_async=use_async, balancing=balancing)
    big = _queued_batch(32, use_async=use_async, balancing=balancing)
    return _per(big.counts, small.counts), _per(big.worker, small.worker)


def _per(big: Counts, small: Counts) -> Counts:
    per: Counts = collections.Counter()
    for key in small.keys() | big.keys():
        per[key] = round((big[key] - small[key]) / 16)
    return per


def measure(paths: list[str]) -> dict[str, tuple[Counts, Counts]]:
    """Opcode counts per request for each named path: in all threads, and on inferkit's worker."""
    x = np.zeros((1, 4), np.float32)
    runs: dict[str, Callable[[], tuple[Counts, Counts]]] = {
        "queued": queued,
        "queued-async": lambda: queued(use_async=True),
        "queued-rr": lambda: queued(balancing="round_robin"),
    }
    out: dict[str, tuple[Counts, Counts]] = {}
    for name in paths:
        if name == "lone":
            with inferkit.Predictor.from_callable(lambda a: a, max_delay_ms=0) as p:
                out[name] = lone(p, x), collections.Counter()
        elif name == "lone-onnx":
            with inferkit.Predictor.from_onnx(identity_bytes(4)) as p:
                out[name] = lone(p, x), collections.Counter()
        else:
            out[name] = runs[name]()
    return out


def callgrind() -> str:
    """Machine instructions per lone no-op predict under valgrind, or why there is no figure.

    Only the measured calls are counted: they run inside ``itertools.starmap`` (its C function
    ``starmap_next``, which nothing else here calls) and callgrind collects only inside that
    function. Start-up, imports and warm-up stay out, so the figure repeats exactly.
    """
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        return "skipped: valgrind is not installed"
    cmd = [
        valgrind,
        "--tool=callgrind",
        "--collect-atstart=no",
        "--toggle-collect=starmap_next",
        "--callgrind-out-file=/dev/null",
        sys.executable,
        __file__,
        f"--loop={CALLGRIND_CALLS}",
    ]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)
    found = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode or found is None or int(found.group(1)) == 0:  # 0: the interpreter has no symbols
        return f"skipped: valgrind failed or counted nothing ({done.stderr.strip()[-200:]})"
    return f"{int(found.group(1)) / CALLGRIND_CALLS:,.0f} instructions per lone no-op predict"


def _loop(n: int) -> None:
    x = np.zeros((1, 4), np.float32)
    with inferkit.Predictor.from_callable(lambda a: a, max_delay_ms=0) as p:
        for _ in range(200):
            p.predict(x)
        collections.deque(itertools.starmap(p.predict, itertools.repeat((x,), n)), maxlen=0)  # the counted calls


def main() -> None:
    """Print the table (and the top functions of each path with ``--top``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    choices = ["lone", "lone-onnx", "queued", "queued-async", "queued-rr"]
    parser.add_argument("--only", default=",".join(choices), help=f"paths, comma-separated: {', '.join(choices)}")
    parser.add_argument("--top", type=int, default=0, help="also list each path's N costliest functions")
    parser.add_argument("--callgrind", action="store_true", help="add valgrind's instructions per lone predict")
    parser.add_argument("--loop", type=int, default=0, help=argparse.SUPPRESS)  # the process valgrind runs
    args = parser.parse_args()
    if args.loop:
        _loop(args.loop)
        return
    paths = [p for p in args.only.split(",") if p]
    unknown = set(paths) - set(choices)
    if unknown:
        parser.error(f"unknown paths {sorted(unknown)}; choose from {choices}")
    counts = measure(paths)
    print(f"inferkit from {Path(inferkit.__file__).parent} | Python {sys.version.split()[0]}")
    print("\n| path | bytecodes per request | on the worker | functions per request |\n|---|---:|---:|---:|")
    for name, (c, w) in counts.items():
        print(f"| {name} | {sum(c.values()):,} | {sum(w.values()):,} | {sum(1 for v in c.values() if v)} |")
    for name, (c, w) in counts.items():
        if args.top:
            print(f"\n{name}:")
            for (file, fn), v in c.most_common(args.top):
                print(f"  {v:6,} {file}:{fn}" + (f" ({w[file, fn]:,} on the worker)" if w[file, fn] else ""))
    if args.callgrind:
        print(f"\ncallgrind: {callgrind()}")


if __name__ == "__main__":
    main()
