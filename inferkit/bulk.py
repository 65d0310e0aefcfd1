"""Offline (bulk) inference: ``map`` and ``stream`` over arrays, files and iterators.

The caller's thread reads and converts the next batch while the replicas run the batches
already submitted: at most ``in_flight`` batches are queued or running at once, so memory
stays bounded by ``in_flight * batch_size`` rows whatever the input's size, and results come
back in input order. Sources:

- a NumPy array, or a dict of arrays by input name (axis 0 is the row);
- a path to a ``.npy`` file (memory-mapped: only the rows in flight are read);
- a path to a ``.parquet`` or ``.csv`` file, read in batches with pyarrow (the ``bulk`` extra);
- any other iterable of batches (arrays or dicts of arrays), read lazily.

A batch that fails with :class:`~inferkit.InvalidInput` or :class:`~inferkit.ModelError` is
split in halves until the failing rows are found; ``on_error`` then decides: ``"raise"``
(default) ends the job with that error, ``"skip"`` leaves those rows out of the output, and
``"collect"`` leaves them out and hands back a :class:`RowError` for each. Refusals that
are not a row's fault (``Overloaded``, ``Closed``, ``NoHealthyReplica``) always end the job.
"""

from __future__ import annotations

import collections
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Literal, Protocol, TextIO

import attrs
import numpy as np

from inferkit.errors import InvalidInput, ModelError
from inferkit.signature import Signature

__all__ = [
    "BulkPart",
    "BulkResult",
    "JobMismatch",
    "Progress",
    "RowError",
    "map_batches",
    "read",
    "run_job",
    "stream_batches",
    "total_rows",
]

OnError = Literal["raise", "skip", "collect"]
_ROW_FAULTS = (InvalidInput, ModelError)  # the rows' own fault: bisected, then per on_error
_FILE_SUFFIXES = (".npy", ".parquet", ".csv")
_READ_BUFFER_BYTES = 1 << 20


class Submitter(Protocol):
    """What bulk inference runs on: a :class:`~inferkit.Predictor` or :class:`~inferkit.Router`."""

    def submit(self, x: Any, *, timeout: float | None = None, priority: int = 0) -> Future[Any]:
        """Queue ``x`` and return a future of its result."""
        ...


@attrs.frozen
class RowError:
    """A row left out of the output: its index in the input and why."""

    index: int
    error: BaseException


@attrs.frozen
class BulkPart:
    """One part of a ``stream(..., on_error="collect")``: kept rows' outputs, their input indices, errors."""

    outputs: Any
    rows: np.ndarray[Any, Any]
    errors: tuple[RowError, ...]


@attrs.frozen
class BulkResult:
    """What ``map(..., on_error="collect")`` returns: outputs of the kept rows in order, their input indices, errors."""

    outputs: Any
    rows: np.ndarray[Any, Any]
    errors: tuple[RowError, ...]


# -- sources ----------------------------------------------------------------------------------


def _rows(batch: Any) -> int:
    if isinstance(batch, Mapping):
        return len(next(iter(batch.values())))
    return len(batch)


def _slice(batch: Any, start: int, stop: int) -> Any:
    if isinstance(batch, Mapping):
        return {k: v[start:stop] for k, v in batch.items()}
    return batch[start:stop]


def _concat(parts: list[Any]) -> Any:
    if not parts:
        return None
    if isinstance(parts[0], Mapping):
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return np.concatenate(parts)


def _is_file(data: Any) -> bool:
    return isinstance(data, str | os.PathLike) and Path(data).suffix.lower() in _FILE_SUFFIXES


def _needs_pyarrow(what: str) -> Any:
    try:
        import pyarrow as pa  # noqa: PLC0415  (the bulk extra)
    except ImportError as error:
        msg = f"reading {what} needs pyarrow: pip install 'inferkit-serve[bulk]'"
        raise ImportError(msg) from error
    return pa


def _table_batch(batch: Any, signature: Signature | None) -> Any:
    """Arrays for the model from a pyarrow RecordBatch.

    Columns named after the model's inputs feed those inputs (a list column becomes a 2-D
    array); a one-input model whose input has no column of its name takes every column,
    stacked in file order, as its features.
    """
    names = list(batch.schema.names)
    inputs = [s.name for s in signature.inputs] if signature is not None else []
    if inputs and all(n in names for n in inputs):
        arrays = {n: _column(batch.column(names.index(n))) for n in inputs}
        if signature is not None:
            arrays = {s.name: arrays[s.name].astype(s.dtype, copy=False) for s in signature.inputs}
        return arrays if len(arrays) > 1 else next(iter(arrays.values()))
    if len(inputs) > 1:
        msg = f"the model's inputs {inputs} need columns of those names; the file has {names}"
        raise InvalidInput(msg)
    stacked = np.column_stack([_column(c) for c in batch.columns]) if names else np.empty((0, 0))
    if signature is not None:
        stacked = stacked.astype(signature.inputs[0].dtype, copy=False)
    return stacked


def _column(column: Any) -> np.ndarray[Any, Any]:
    import pyarrow as pa  # noqa: PLC0415

    if pa.types.is_fixed_size_list(column.type) or pa.types.is_list(column.type):
        return np.asarray(column.to_pylist()) if column.null_count else np.stack(column.to_numpy(zero_copy_only=False))
    return np.asarray(column.to_numpy(zero_copy_only=False))


def _file_batches(path: Path, batch_size: int, signature: Signature | None, skip: int) -> Iterator[Any]:
    suffix = path.suffix.lower()
    if suffix == ".npy":
        array = np.load(path, mmap_mode="r")
        for start in range(skip, len(array), batch_size):
            yield np.array(array[start : start + batch_size])  # read these rows off the map, and only these
        return
    pa = _needs_pyarrow(path.name)
    if suffix == ".parquet":
        import pyarrow.parquet as pq  # noqa: PLC0415

        # No pre-buffering and no read-ahead threads: memory holds one row group, not the whole file.
        with pq.ParquetFile(path, pre_buffer=False, buffer_size=_READ_BUFFER_BYTES) as file:
            batches = file.iter_batches(batch_size=batch_size, use_threads=False)
            yield from _rebatch(batches, batch_size, signature, skip, pa)
        return
    import pyarrow.csv as pcsv  # noqa: PLC0415

    with pcsv.open_csv(path) as reader:
        yield from _rebatch(reader, batch_size, signature, skip, pa)


def _rebatch(batches: Iterable[Any], batch_size: int, signature: Signature | None, skip: int, pa: Any) -> Iterator[Any]:
    """Record batches of exactly ``batch_size`` rows (the last may be short), ``skip`` rows dropped."""
    held: list[Any] = []
    count = 0
    for record in batches:
        batch = record
        if skip:
            drop = min(skip, batch.num_rows)
            batch, skip = batch.slice(drop), skip - drop
        held.append(batch)
        count += batch.num_rows
        while count >= batch_size:
            table = pa.Table.from_batches(held).combine_chunks()
            yield _table_batch(table.slice(0, batch_size).to_batches()[0], signature)
            rest = table.slice(batch_size)
            held, count = (rest.to_batches() if rest.num_rows else []), rest.num_rows
    if count:
        table = pa.Table.from_batches(held).combine_chunks()
        yield _table_batch(table.to_batches()[0], signature)


def total_rows(data: Any) -> int | None:
    """Rows in ``data`` when known without reading it (arrays, ``.npy`` and Parquet files)."""
    if _is_file(data):
        path = Path(data)
        suffix = path.suffix.lower()
        if suffix == ".npy":
            return int(np.load(path, mmap_mode="r").shape[0])
        if suffix == ".parquet":
            _needs_pyarrow(path.name)
            import pyarrow.parquet as pq  # noqa: PLC0415

            return int(pq.ParquetFile(path).metadata.num_rows)
        return None
    if isinstance(data, np.ndarray | Mapping):
        return _rows(data)
    return None


def read(data: Any, batch_size: int, *, signature: Signature | None = None, skip: int = 0) -> Iterator[Any]:
    """The batches of ``data`` (any source the module takes), ``batch_size`` rows each, ``skip`` rows dropped.

    Items of an iterable longer than ``batch_size`` are split; shorter ones stay as they are.
    """
    if _is_file(data):
        yield from _file_batches(Path(data), batch_size, signature, skip)
        return
    if isinstance(data, np.ndarray | Mapping):
        for start in range(skip, _rows(data), batch_size):
            yield _slice(data, start, start + batch_size)
        return
    if isinstance(data, str | bytes | os.PathLike):
        msg = f"cannot read {data!r}: give a .npy, .parquet or .csv path, an array, or an iterable of batches"
        raise TypeError(msg)
    for item in data:
        n = _rows(item)
        if skip >= n:
            skip -= n
            continue
        for start in range(skip, n, batch_size):
            yield _slice(item, start, start + batch_size)
        skip = 0


# -- progress ---------------------------------------------------------------------------------


class Progress:
    """A one-line progress report on a terminal: rows done, rows/s and the time left when known.

    Writes nothing when ``stream`` is not a terminal, so logs and pipes never fill with it.
    """

    def __init__(self, total: int | None, *, stream: TextIO | None = None, every_s: float = 0.2) -> None:
        self.total = total
        self._stream = stream if stream is not None else sys.stderr
        self._live = bool(getattr(self._stream, "isatty", lambda: False)())
        self._every = every_s
        self._start = time.monotonic()
        self._last = -math.inf
        self.done = 0

    def update(self, rows: int) -> None:
        """Count ``rows`` more rows finished."""
        self.done += rows
        now = time.monotonic()
        if self._live and now - self._last >= self._every:
            self._last = now
            self._write(now)

    def close(self) -> None:
        """Write the final line and end it."""
        if self._live:
            self._write(time.monotonic())
            self._stream.write("\n")
            self._stream.flush()

    def _write(self, now: float) -> None:
        elapsed = max(now - self._start, 1e-9)
        rate = self.done / elapsed
        if self.total:
            left = (self.total - self.done) / rate if rate > 0 else math.inf
            eta = f" ETA {left:.0f}s" if math.isfinite(left) else ""
            text = f"{self.done}/{self.total} rows ({100 * self.done / self.total:.0f}%) {rate:,.0f} rows/s{eta}"
        else:
            text = f"{self.done} rows {rate:,.0f} rows/s"
        self._stream.write(f"\r{text}   ")
        self._stream.flush()


# -- the pipeline ------------------------------------------------------------------------------


@attrs.frozen
class _Done:
    outputs: Any  # None when no row of the batch survived
    rows: np.ndarray[Any, Any]
    errors: tuple[RowError, ...]


def _bisect(target: Submitter, batch: Any, first: int, timeout: float | None) -> _Done:
    """Run ``batch`` in halves, then rows, to keep what runs and name what fails."""
    n = _rows(batch)
    try:
        out = target.submit(batch, timeout=timeout).result()
    except _ROW_FAULTS as error:
        if n == 1:
            return _Done(None, np.empty(0, dtype=np.int64), (RowError(first, error),))
        mid = n // 2
        left = _bisect(target, _slice(batch, 0, mid), first, timeout)
        right = _bisect(target, _slice(batch, mid, n), first + mid, timeout)
        kept = [d.outputs for d in (left, right) if d.outputs is not None]
        return _Done(
            _concat(kept) if kept else None, np.concatenate([left.rows, right.rows]), left.errors + right.errors
        )
    return _Done(out, np.arange(first, first + n, dtype=np.int64), ())


def _parts(
    target: Submitter,
    batches: Iterable[Any],
    in_flight: int,
    on_error: OnError,
    timeout: float | None,
    progress: Progress | None,
) -> Iterator[_Done]:
    """Keep ``in_flight`` batches submitted; yield each batch's result in input order."""
    pending: collections.deque[tuple[int, Any, Future[Any] | BaseException]] = collections.deque()
    source = iter(batches)
    first = 0
    exhausted = False
    try:
        while True:
            while not exhausted and len(pending) < in_flight:
                batch = next(source, None)
                if batch is None:
                    exhausted = True
                    break
                try:
                    job: Future[Any] | BaseException = target.submit(batch, timeout=timeout)
                except _ROW_FAULTS as error:  # refused whole at submit: bisected when its turn comes
                    job = error
                pending.append((first, batch, job))
                first += _rows(batch)
            if not pending:
                return
            start, batch, job = pending.popleft()
            n = _rows(batch)
            try:
                if isinstance(job, BaseException):
                    raise job
                done = _Done(job.result(), np.arange(start, start + n, dtype=np.int64), ())
            except _ROW_FAULTS:
                if on_error == "raise":
                    raise
                done = _bisect(target, batch, start, timeout)
            if progress is not None:
                progress.update(n)
            yield done
    finally:
        for _, _, job in pending:  # the caller stopped early or a batch failed: drop what is queued
            if isinstance(job, Future):
                job.cancel()
        if progress is not None:
            progress.close()


def _check(batch_size: int, in_flight: int, on_error: str) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        msg = f"batch_size must be an int >= 1, got {batch_size!r}"
        raise ValueError(msg)
    if not isinstance(in_flight, int) or in_flight < 1:
        msg = f"in_flight must be an int >= 1, got {in_flight!r}"
        raise ValueError(msg)
    if on_error not in {"raise", "skip", "collect"}:
        msg = f"on_error must be 'raise', 'skip' or 'collect', got {on_error!r}"
        raise ValueError(msg)


def _progress(progress: bool | Progress, data: Any) -> Progress | None:
    if isinstance(progress, Progress):
        return progress
    return Progress(total_rows(data)) if progress else None


def stream_batches(
    target: Submitter,
    data: Any,
    *,
    batch_size: int = 256,
    in_flight: int = 8,
    on_error: OnError = "raise",
    progress: bool | Progress = False,
    timeout: float | None = None,
) -> Iterator[Any]:
    """Results of ``data`` run on ``target``, one per batch of ``batch_size`` rows, in input order.

    See :meth:`inferkit.Predictor.stream`.
    """
    _check(batch_size, in_flight, on_error)
    signature = getattr(target, "signature", None)
    batches = read(data, batch_size, signature=signature if isinstance(signature, Signature) else None)
    for done in _parts(target, batches, in_flight, on_error, timeout, _progress(progress, data)):
        if on_error == "collect":
            yield BulkPart(done.outputs, done.rows, done.errors)
        elif done.outputs is not None:
            yield done.outputs


def map_batches(
    target: Submitter,
    data: Any,
    *,
    batch_size: int = 256,
    in_flight: int = 8,
    on_error: OnError = "raise",
    progress: bool | Progress = False,
    timeout: float | None = None,
) -> Any:
    """Every result of ``data`` run on ``target``, joined in input order. See :meth:`inferkit.Predictor.map`."""
    _check(batch_size, in_flight, on_error)
    signature = getattr(target, "signature", None)
    batches = read(data, batch_size, signature=signature if isinstance(signature, Signature) else None)
    kept: list[Any] = []
    rows: list[np.ndarray[Any, Any]] = []
    errors: list[RowError] = []
    for done in _parts(target, batches, in_flight, on_error, timeout, _progress(progress, data)):
        if done.outputs is not None:
            kept.append(done.outputs)
        rows.append(done.rows)
        errors.extend(done.errors)
    outputs = _concat(kept)
    if on_error == "collect":
        index = np.concatenate(rows) if rows else np.empty(0, dtype=np.int64)
        return BulkResult(outputs, index, tuple(errors))
    return outputs


# -- resumable jobs (inferkit predict) ----------------------------------------------------------


class JobMismatch(ValueError):
    """The unfinished job found beside the output was started with other settings."""


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` to a temporary name beside ``path``, flush it to disk, then rename it into place."""
    temporary = path.with_name(path.name + ".tmp")
    write(temporary)
    with temporary.open("rb+") as f:
        os.fsync(f.fileno())
    temporary.replace(path)


def _save_part(path: Path, outputs: Any) -> None:
    def write(temporary: Path) -> None:
        with temporary.open("wb") as f:
            if isinstance(outputs, Mapping):
                np.savez(f, **outputs)
            else:
                np.save(f, outputs)

    _atomic_write(path, write)


def _load_part(path: Path) -> Any:
    if path.suffix == ".npz":
        with np.load(path) as loaded:
            return {k: loaded[k] for k in loaded.files}
    return np.load(path)


def _arrow_table(outputs: Any, single: str) -> Any:
    import pyarrow as pa  # noqa: PLC0415

    named = outputs if isinstance(outputs, Mapping) else {single: outputs}
    columns = {}
    for name, array in named.items():
        if array.ndim == 1:
            columns[name] = pa.array(array)
        else:
            width = int(np.prod(array.shape[1:]))
            columns[name] = pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(array).ravel()), width)
    return pa.table(columns)


def _assemble(parts: list[Path], output: Path, single: str) -> None:
    """Join the finished parts into ``output`` under a temporary name, then rename it."""
    suffix = output.suffix.lower()

    def write(temporary: Path) -> None:
        if suffix == ".parquet":
            import pyarrow.parquet as pq  # noqa: PLC0415

            writer = None
            try:
                for part in parts:
                    table = _arrow_table(_load_part(part), single)
                    if writer is None:
                        writer = pq.ParquetWriter(temporary, table.schema)
                    writer.write_table(table)
            finally:
                if writer is not None:
                    writer.close()
            return
        loaded = [_load_part(p) for p in parts]
        if loaded and isinstance(loaded[0], Mapping):
            msg = f"the model has several outputs {sorted(loaded[0])}: write them to a .parquet file"
            raise ValueError(msg)
        rows = sum(len(a) for a in loaded)
        shape = (rows, *loaded[0].shape[1:]) if loaded else (0,)
        dtype = loaded[0].dtype if loaded else np.float32
        target = np.lib.format.open_memmap(temporary, mode="w+", dtype=dtype, shape=shape)
        start = 0
        for array in loaded:
            target[start : start + len(array)] = array
            start += len(array)
        target.flush()
        del target

    _atomic_write(output, write)


def run_job(
    target: Submitter,
    data: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    batch_size: int = 256,
    chunk_rows: int = 65536,
    in_flight: int = 8,
    progress: bool = False,
) -> int:
    """Run every row of the file ``data`` and write the results to ``output`` (``.npy`` or ``.parquet``).

    Resumable: each chunk of ``chunk_rows`` rows is written to ``<output>.parts/`` under a
    temporary name, renamed, and only then listed in the manifest there; a job stopped at any
    point (a signal, a crash, a power cut) and run again starts after the last listed chunk.
    ``output`` itself only appears, whole, by a rename once every chunk is done, and the parts
    are then removed. Returns the number of rows written.
    """
    _check(batch_size, in_flight, "raise")
    if not isinstance(chunk_rows, int) or chunk_rows < 1:
        msg = f"chunk_rows must be an int >= 1, got {chunk_rows!r}"
        raise ValueError(msg)
    source, output = Path(data), Path(output)
    if output.suffix.lower() not in {".npy", ".parquet"}:
        msg = f"the output must be a .npy or .parquet file, got {output.name}"
        raise ValueError(msg)
    if output.suffix.lower() == ".parquet":
        _needs_pyarrow(output.name)
    parts_dir = output.with_name(output.name + ".parts")
    manifest_path = parts_dir / "manifest.json"
    settings = {"input": str(source.resolve()), "chunk_rows": chunk_rows}
    chunks: list[dict[str, Any]] = []
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest["settings"] != settings:
            msg = (
                f"{parts_dir} holds an unfinished job with {manifest['settings']}, not {settings}: "
                "run it with those settings, or delete that folder to start over"
            )
            raise JobMismatch(msg)
        chunks = manifest["chunks"]
    parts_dir.mkdir(parents=True, exist_ok=True)
    done_rows = sum(c["rows"] for c in chunks)
    signature = getattr(target, "signature", None)
    meter = _progress(progress, source)
    if meter is not None:
        meter.done = done_rows
    try:
        for chunk in read(
            source, chunk_rows, signature=signature if isinstance(signature, Signature) else None, skip=done_rows
        ):
            outputs = map_batches(target, chunk, batch_size=batch_size, in_flight=in_flight)
            name = f"part-{len(chunks):06d}" + (".npz" if isinstance(outputs, Mapping) else ".npy")
            _save_part(parts_dir / name, outputs)
            chunks.append({"file": name, "rows": _rows(chunk)})
            record = json.dumps({"settings": settings, "chunks": chunks}, indent=1)
            _atomic_write(manifest_path, lambda p, text=record: p.write_text(text))  # type: ignore[misc]
            if meter is not None:
                meter.update(_rows(chunk))
    finally:
        if meter is not None:
            meter.close()
    outputs = signature.outputs if isinstance(signature, Signature) else ()
    single = outputs[0].name if len(outputs) == 1 else "output"  # a one-output model's column keeps its name
    _assemble([parts_dir / c["file"] for c in chunks], output, single)
    shutil.rmtree(parts_dir)
    return sum(c["rows"] for c in chunks)
