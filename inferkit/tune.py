"""``inferkit bench``: throughput and latency under a grid of settings, and the best under a p99 target.

Like Triton's Model Analyzer, on the user's own machine in seconds: the model's own best
batched throughput is measured first (one session, large batches, no batching layer), then
every combination of ``max_batch_size``, ``max_delay_ms``, ``replicas`` and intra-op threads
is loaded by ``concurrency`` callers sending requests of ``rows`` rows for ``duration_s``.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import attrs
import numpy as np

from inferkit._validators import is_finite, number
from inferkit.backends.machine import usable_cores
from inferkit.batching import BatchConfig
from inferkit.signature import Signature

_T = TypeVar("_T")

__all__ = ["TEXT", "BenchConfig", "BenchReport", "Measurement", "Settings", "bench", "render"]


TEXT = "inferkit bench"
"""What each element of a string input holds (ones would be refused: a string tensor holds text)."""


def _listed(value: Any) -> Any:
    """A list as a tuple; anything else as it is, for the validator to refuse (``tuple(5)`` is a TypeError)."""
    return tuple(value) if isinstance(value, list | tuple) else value


def _whole(value: object, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _positive_ints(_instance: object, attribute: attrs.Attribute[Any], value: tuple[int, ...]) -> None:
    if not isinstance(value, tuple) or not value or not all(_whole(v, 1) for v in value):
        msg = f"{attribute.name} must be a non-empty tuple of ints >= 1, got {value!r}"
        raise ValueError(msg)


def _threads(_instance: object, attribute: attrs.Attribute[Any], value: tuple[int | None, ...]) -> None:
    if not isinstance(value, tuple) or not value or not all(v is None or _whole(v, 1) for v in value):
        msg = f"{attribute.name} must be a non-empty tuple of ints >= 1 or None (inferkit's default), got {value!r}"
        raise ValueError(msg)


def _default_replicas() -> tuple[int, ...]:
    return (1, 2) if usable_cores() >= 4 else (1,)  # a container counts its CPU quota, not its node


@attrs.frozen
class Settings:
    """One point of the grid."""

    max_batch_size: int
    max_delay_ms: float
    replicas: int
    intra_op_threads: int | None  # None: inferkit's default for that many replicas


@attrs.frozen
class BenchConfig:
    """What ``inferkit bench`` measures; the defaults run in seconds."""

    concurrency: tuple[int, ...] = attrs.field(default=(1, 8, 32), converter=_listed, validator=_positive_ints)
    rows: tuple[int, ...] = attrs.field(default=(1, 8, 64), converter=_listed, validator=_positive_ints)
    p99_ms: float = attrs.field(default=10.0, validator=number(0, inclusive=False))
    duration_s: float = attrs.field(default=0.25, validator=number(0, inclusive=False))
    max_batch_sizes: tuple[int, ...] = attrs.field(default=(64, 256), converter=_listed, validator=_positive_ints)
    max_delays_ms: tuple[float, ...] = attrs.field(default=(0.5, 2.0), converter=_listed)
    replicas: tuple[int, ...] = attrs.field(factory=_default_replicas, converter=_listed, validator=_positive_ints)
    intra_op_threads: tuple[int | None, ...] = attrs.field(default=(None,), converter=_listed, validator=_threads)

    @max_delays_ms.validator
    def _check_delays(self, attribute: attrs.Attribute[tuple[float, ...]], value: tuple[float, ...]) -> None:
        if not isinstance(value, tuple) or not value or not all(is_finite(v) and v >= 0 for v in value):
            msg = f"{attribute.name} must be a non-empty tuple of numbers >= 0, got {value!r}"
            raise ValueError(msg)

    def __attrs_post_init__(self) -> None:
        # Refused before any work: requests that no predictor of these settings would take, or
        # that the callers together would queue past its queue (``InvalidInput``, ``Overloaded``).
        queue = BatchConfig().max_queue_size  # what bench's predictors get, the library's default
        most = max(1, queue // 2)  # the batches one request may be split into (admission's rule)
        callers = max(self.concurrency)
        for size in self.max_batch_sizes:
            for rows in self.rows:
                parts = -(-rows // size)
                if parts > most:
                    msg = (
                        f"rows={rows} at max_batch_size={size} is {parts} batches per request, and a request may "
                        f"take at most {most} (half of max_queue_size={queue}): give rows <= {size * most} "
                        "or a larger max_batch_size"
                    )
                    raise ValueError(msg)
                if callers * parts > queue:
                    msg = (
                        f"concurrency={callers} callers of rows={rows} at max_batch_size={size} queue "
                        f"{callers * parts} batches at once, more than max_queue_size={queue}: give fewer callers "
                        "or rows, or a larger max_batch_size"
                    )
                    raise ValueError(msg)

    def grid(self) -> Iterator[Settings]:
        """Every combination of the settings to try."""
        for size in self.max_batch_sizes:
            for delay in self.max_delays_ms:
                for replicas in self.replicas:
                    for threads in self.intra_op_threads:
                        yield Settings(size, delay, replicas, threads)


@attrs.frozen
class Measurement:
    """One settings point under one load."""

    settings: Settings
    concurrency: int
    rows: int
    rows_per_s: float
    p50_ms: float
    p99_ms: float
    ratio: float  # rows_per_s over the model's own best batched throughput


@attrs.frozen
class BenchReport:
    """Every measurement, the model's own best throughput, and the recommendation."""

    best_batched_rows_per_s: float
    measurements: tuple[Measurement, ...]
    recommended: Settings | None  # the most total throughput with every load's p99 under the target


def _inputs(signature: Signature, rows: int) -> dict[str, np.ndarray[Any, Any]]:
    """Ones of each input's dtype, or :data:`TEXT` for a string input; a dynamic non-batch dim is 1."""
    inputs = {}
    for spec in signature.inputs:
        shape = (rows, *(d or 1 for d in spec.shape[1:]))
        inputs[spec.name] = np.full(shape, TEXT, dtype=object) if spec.dtype.kind == "O" else np.ones(shape, spec.dtype)
    return inputs


def _best_batched(model: Path, config: BenchConfig) -> tuple[float, Signature]:
    """The model's own best rows per second, in batches as large as it takes; ``ValueError`` if it fails on them."""
    from inferkit.backends.onnx import OnnxBackend, fixed_rows  # noqa: PLC0415

    duration_s = config.duration_s
    backend = _loaded(model, lambda: OnnxBackend(model))
    try:
        fixed = fixed_rows(backend.session)  # its calls take that many rows, whatever the batch (in chunks)
        best = 0.0
        for size in (64, 256, 1024) if fixed is None else (fixed,):
            x = _inputs(backend.signature, size)
            try:
                backend.run(x)  # warm-up
            except Exception as error:
                msg = f"the model fails on generated inputs of {size} rows: {type(error).__name__}: {error}"
                raise ValueError(msg) from error
            done, start = 0, time.monotonic()
            while True:  # at least one call, however short ``duration_s``
                backend.run(x)
                done += size
                if (elapsed := time.monotonic() - start) >= duration_s:
                    break
            best = max(best, done / max(elapsed, 1e-9))
        return best, backend.signature
    finally:
        backend.close()


def _loaded(model: str | os.PathLike[str], load: Callable[[], _T]) -> _T:
    """``load()``; what it raises but a ``ValueError`` (ONNX Runtime's own, ``OSError``) as one saying so."""
    try:
        return load()
    except ValueError:
        raise
    except Exception as error:  # InvalidProtobuf, Fail, InvalidArgument from a warm-up on zeros...
        msg = f"{os.fspath(model)} does not load: {type(error).__name__}: {error}"
        raise ValueError(msg) from error


def _load(predictor: Any, x: Any, concurrency: int, duration_s: float) -> tuple[float, list[float]]:
    """``concurrency`` closed-loop callers for ``duration_s``: rows per second and every latency.

    Each caller makes at least one call, however short ``duration_s``: every load has a latency.
    The first error a call raises stops every caller and is raised here, once all have stopped.
    """
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    rows = len(next(iter(x.values())))
    gate = threading.Barrier(concurrency + 1)
    end = [0.0]
    errors: list[Exception] = []

    def caller(mine: list[float]) -> None:
        gate.wait()
        try:
            while not errors:
                now = time.monotonic()
                predictor.predict(x)
                done = time.monotonic()
                mine.append(done - now)
                if done >= end[0]:
                    break
        except Exception as error:  # noqa: BLE001  (raised on the main thread, not printed by this one)
            errors.append(error)

    threads = [threading.Thread(target=caller, args=(m,), name="bench-caller") for m in latencies]
    for thread in threads:
        thread.start()
    start = time.monotonic()
    end[0] = start + duration_s
    gate.wait()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    elapsed = time.monotonic() - start
    flat = [v for m in latencies for v in m]
    return rows * len(flat) / elapsed, flat


def bench(model: str | os.PathLike[str], config: BenchConfig | None = None) -> BenchReport:
    """Measure ``model`` (an ONNX file) over ``config``'s grid and loads.

    Inputs are generated: ones of each input's dtype, :data:`TEXT` for a string input (any
    dynamic non-batch dimension 1).
    ``ValueError`` says why when the model does not load or fails on them, when it cannot take
    ``config``'s batches, or when a request of a load fails.
    """
    from inferkit.predictor import Predictor  # noqa: PLC0415

    config = config or BenchConfig()
    best, signature = _best_batched(Path(model), config)
    measurements: list[Measurement] = []
    for settings in config.grid():
        loading = functools.partial(
            Predictor.from_onnx,
            model,
            max_batch_size=settings.max_batch_size,
            max_delay_ms=settings.max_delay_ms,
            replicas=settings.replicas,
            intra_op_threads=settings.intra_op_threads,
        )
        with _loaded(model, loading) as predictor:
            for concurrency in config.concurrency:
                for rows in config.rows:
                    try:
                        rate, latencies = _load(predictor, _inputs(signature, rows), concurrency, config.duration_s)
                    except Exception as error:
                        msg = (
                            f"a request failed under load ({concurrency} callers of {rows} rows, max_batch_size="
                            f"{settings.max_batch_size}, max_delay_ms={settings.max_delay_ms:g}, replicas="
                            f"{settings.replicas}): {type(error).__name__}: {error}"
                        )
                        raise ValueError(msg) from error
                    p50, p99 = (float(np.percentile(latencies, q)) * 1e3 for q in (50, 99))
                    measurements.append(Measurement(settings, concurrency, rows, rate, p50, p99, rate / best))
    return BenchReport(best, tuple(measurements), _recommend(measurements, config.p99_ms))


def _recommend(measurements: list[Measurement], p99_ms: float) -> Settings | None:
    by_settings: dict[Settings, list[Measurement]] = {}
    for m in measurements:
        by_settings.setdefault(m.settings, []).append(m)
    fitting = {s: ms for s, ms in by_settings.items() if all(m.p99_ms <= p99_ms for m in ms)}
    if not fitting:
        return None
    return max(fitting, key=lambda s: sum(m.rows_per_s for m in fitting[s]))


def render(report: BenchReport, config: BenchConfig) -> str:
    """The report as a table: per load, the best settings under the target, then the recommendation."""
    lines = [
        f"model's own best batched throughput: {report.best_batched_rows_per_s:,.0f} rows/s",
        "",
        (
            f"{'conc':>5} {'rows':>5} {'max_batch':>9} {'delay_ms':>8} {'replicas':>8} {'threads':>7} "
            f"{'rows/s':>12} {'p50_ms':>8} {'p99_ms':>8} {'ratio':>6}"
        ),
    ]
    for concurrency in config.concurrency:
        for rows in config.rows:
            load = [m for m in report.measurements if (m.concurrency, m.rows) == (concurrency, rows)]
            under = [m for m in load if m.p99_ms <= config.p99_ms]
            m = max(under or load, key=lambda m: m.rows_per_s)
            s = m.settings
            mark = "" if under else "  (none under the p99 target; fastest shown)"
            threads = "auto" if s.intra_op_threads is None else str(s.intra_op_threads)
            lines.append(
                f"{concurrency:>5} {rows:>5} {s.max_batch_size:>9} {s.max_delay_ms:>8g} {s.replicas:>8} {threads:>7} "
                f"{m.rows_per_s:>12,.0f} {m.p50_ms:>8.2f} {m.p99_ms:>8.2f} {m.ratio:>6.2f}{mark}"
            )
    lines.append("")
    r = report.recommended
    if r is None:
        lines.append(f"recommended: no settings kept p99 <= {config.p99_ms:g} ms under every load")
    else:
        threads = "" if r.intra_op_threads is None else f" --intra-op-threads {r.intra_op_threads}"
        lines.append(
            f"recommended (p99 <= {config.p99_ms:g} ms under every load, most throughput): "
            f"--max-batch-size {r.max_batch_size} --max-delay-ms {r.max_delay_ms:g} --replicas {r.replicas}{threads}"
        )
    return "\n".join(lines)
