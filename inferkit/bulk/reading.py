"""Where bulk rows come from: arrays, ``.npy``/Parquet/CSV files and iterators, read in batches of a size."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from inferkit.errors import InvalidInput
from inferkit.signature import Signature

_FILE_SUFFIXES = (".npy", ".parquet", ".csv")
_READ_BUFFER_BYTES = 1 << 20


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
