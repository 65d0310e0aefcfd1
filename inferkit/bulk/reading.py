"""Where bulk rows come from: arrays, ``.npy``/Parquet/CSV files and iterators, read in batches of a size."""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from inferkit.errors import InvalidInput
from inferkit.signature import _FAMILY, Signature, TensorSpec

_FILE_SUFFIXES = (".npy", ".parquet", ".csv")
_READ_BUFFER_BYTES = 1 << 20


def _rows(batch: Any) -> int:
    """Rows in a batch; ``InvalidInput`` for one without a row axis or a dict of unequal rows.

    Checked here, where every source passes, so no ``on_error`` mode can cut a dict's inputs
    to the first one's rows and drop the rest silently.
    """
    if not isinstance(batch, Mapping):
        return _length("the input", batch)
    if not batch:
        msg = "expected at least one input, got an empty mapping"
        raise InvalidInput(msg)
    counts = {name: _length(f"input {name!r}", value) for name, value in batch.items()}
    if len(set(counts.values())) > 1:
        msg = f"inputs need equal rows, got {counts}"
        raise InvalidInput(msg)
    return next(iter(counts.values()))


def _length(what: str, value: Any) -> int:
    try:
        return len(value)
    except TypeError:
        msg = f"{what} has no row axis (a {type(value).__name__} of shape {getattr(value, 'shape', '?')})"
        raise InvalidInput(msg) from None


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


@attrs.frozen(eq=False)
class _Flawed:
    """Rows read from a file, some of which no input can take: each fault's mask marks its rows.

    ``batch`` holds the rows as the model takes them, a stand-in value where a row is flawed
    (None when no row is whole). A slice holding a flawed row is never sent: :meth:`unwrap`
    raises that fault's :class:`~inferkit.InvalidInput`, so ``on_error`` bisects to those rows
    as to any other bad row.
    """

    batch: Any
    faults: tuple[tuple[np.ndarray[Any, Any], InvalidInput], ...]

    def __len__(self) -> int:
        return len(self.faults[0][0])

    def __getitem__(self, rows: slice) -> _Flawed:
        batch = None if self.batch is None else _slice(self.batch, rows.start, rows.stop)
        return _Flawed(batch, tuple((mask[rows], error) for mask, error in self.faults))

    def unwrap(self) -> Any:
        """The rows to send; the error of the first fault any of them has, raised, if one has."""
        for mask, error in self.faults:
            if mask.any():
                raise error.with_traceback(None)  # raised once per slice: keep the traceback short
        return self.batch

    def whole(self) -> InvalidInput | None:
        """The error of a fault every row has (no slice of these rows could pass), else None."""
        return next((error for mask, error in self.faults if mask.all()), None)


def _flawed(batch: Any, faults: list[tuple[np.ndarray[Any, Any], InvalidInput]]) -> Any:
    return _Flawed(batch, tuple(faults)) if faults else batch


def _table_batch(batch: Any, signature: Signature | None) -> Any:
    """Arrays for the model from a pyarrow RecordBatch.

    Columns named after the model's inputs feed those inputs (a list column becomes a 2-D
    array); a one-input model whose input has no column of its name takes every column,
    stacked in file order, as its features. Each column is checked against the input before
    it is stacked (stacking would promote a bool or an int to a float, or fail on a date);
    a column no input takes, or a null fed to an input other than a float one, flaws its rows.
    """
    names = list(batch.schema.names)
    inputs = [s.name for s in signature.inputs] if signature is not None else []
    faults: list[tuple[np.ndarray[Any, Any], InvalidInput]] = []
    if signature is not None and all(n in names for n in inputs):
        arrays = {s.name: _named(s.name, batch.column(names.index(s.name)), s, faults) for s in signature.inputs}
        return _flawed(_typed(arrays, signature), faults)
    if len(inputs) > 1:
        msg = f"the model's inputs {inputs} need columns of those names; the file has {names}"
        raise InvalidInput(msg)
    if not names:
        return np.empty((0, 0))
    if signature is None:
        try:
            return np.column_stack([_column(c) for c in batch.columns])
        except TypeError as error:  # numpy's DTypePromotionError: a date beside a number
            msg = f"the columns {names} cannot be stacked into one array of features ({error})"
            return _Flawed(None, ((np.ones(batch.num_rows, bool), InvalidInput(msg)),))
    spec = signature.inputs[0]
    features = []
    for name, column in zip(names, batch.columns, strict=True):
        feature = _feature(name, _no_nulls(name, column, spec, faults), spec, faults)
        if feature is None:
            return _Flawed(None, tuple(faults))
        features.append(feature)
    return _flawed(_typed({spec.name: np.column_stack(features)}, signature), faults)


def _named(name: str, column: Any, spec: TensorSpec, faults: list[tuple[np.ndarray[Any, Any], InvalidInput]]) -> Any:
    """The column named after input ``spec`` as its array, flawed rows stood in for.

    A scalar column feeds an input of one value a row, ``(N, 1)``, as its rows (a lone
    column of another name is stacked so too).
    """
    array = _column(_regular(name, _no_nulls(name, column, spec, faults), spec, faults))
    if array.ndim == 1 and len(spec.shape) == 2 and spec.shape[1] in (1, None):
        return array[:, None]
    return array


def _regular(name: str, column: Any, spec: TensorSpec, faults: list[tuple[np.ndarray[Any, Any], InvalidInput]]) -> Any:
    """A list column whose every cell holds one row of the input's width; other cells flawed, and stood in for.

    A null cell, an empty or ragged list made the whole column unstackable (numpy's ValueError
    ended the job, ``on_error`` or not). A null inside a cell flaws its row as a null in a scalar
    column does (:func:`_no_nulls`). Nested lists (inputs past 2-D) are left to the input's checks.
    """
    import pyarrow as pa  # noqa: PLC0415
    import pyarrow.compute as pc  # noqa: PLC0415

    kind = column.type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)):
        return column
    if pa.types.is_nested(kind.value_type) or len(spec.shape) != 2:
        return column
    lengths = pc.list_value_length(column)
    known = lengths.drop_null()
    width = spec.shape[1] if spec.shape[1] is not None else (known[0].as_py() if len(known) else 0)
    bad = pc.fill_null(pc.not_equal(lengths, width), fill_value=True).to_numpy(zero_copy_only=False)
    stand_in = _stand_in(kind.value_type)
    # pyarrow reads ints with a null as float64, which an int input refused for every row of the batch
    holes = spec.dtype.kind != "f" and stand_in is not None and column.flatten().null_count > 0
    if not bad.any() and not holes:
        return column
    cells = column.to_pylist()
    if bad.any():
        msg = f"input {spec.name!r}: expected {spec.describe()}, got a cell of column {name!r} without {width} values"
        faults.append((bad, InvalidInput(msg, input_name=spec.name)))
    if holes:
        gaps = np.array([not short and None in cell for short, cell in zip(bad, cells, strict=True)])
        msg = f"input {spec.name!r}: expected {spec.describe()}, got a null inside a cell of column {name!r}"
        faults.append((gaps, InvalidInput(msg, input_name=spec.name)))
        bad = bad | gaps
    for i in np.flatnonzero(bad):
        cells[i] = [0 if stand_in is None else stand_in] * width  # a number where it has none
    return pa.array(cells, type=column.type)


def _no_nulls(name: str, column: Any, spec: TensorSpec, faults: list[tuple[np.ndarray[Any, Any], InvalidInput]]) -> Any:
    """``column`` with its nulls filled by a stand-in and their rows flawed, for an input that has no null.

    A float input takes a null as NaN, as pyarrow reads it; no other kind has a value for it.
    A list column's nulls are left to the input's checks.
    """
    import pyarrow as pa  # noqa: PLC0415

    if pa.types.is_null(column.type):  # no value at all (a CSV column of empty cells)
        column = column.cast(pa.string() if spec.dtype.kind == "O" else pa.from_numpy_dtype(spec.dtype))
    if not column.null_count or spec.dtype.kind == "f":
        return column
    stand_in = _stand_in(column.type)
    if stand_in is None:
        return column
    msg = f"input {spec.name!r}: expected {spec.describe()}, got a null (an empty cell) in column {name!r}"
    faults.append((column.is_null().to_numpy(zero_copy_only=False), InvalidInput(msg, input_name=spec.name)))
    return column.fill_null(pa.scalar(stand_in, column.type))


_STAND_INS: dict[str, Any] = {"bool": False, "string": "", "large_string": "", "binary": b"", "large_binary": b""}


def _stand_in(kind: Any) -> Any:
    """The value a flawed row's null of Arrow type ``kind`` is stood in by; None for a kind refused whole."""
    import pyarrow as pa  # noqa: PLC0415

    return _STAND_INS.get(str(kind), 0 if pa.types.is_integer(kind) else None)


def _feature(
    name: str, column: Any, spec: TensorSpec, faults: list[tuple[np.ndarray[Any, Any], InvalidInput]]
) -> np.ndarray[Any, Any] | None:
    """Column ``name`` as features of the one input ``spec``, or None (and a fault of every row) if it cannot be.

    Kinds as ``predict`` casts them (whole numbers feed a float input too). For an int input,
    each column is cast to the input's dtype here, values out of its range flawed: int64 and
    uint64 columns stacked as they are would meet in float64.
    """
    array = _column(column)
    dst = spec.dtype
    if array.dtype.kind not in _FAMILY[dst.kind] + ("iu" if dst.kind == "f" else ""):
        msg = f"input {spec.name!r}: expected {spec.describe()}, got column {name!r} of {column.type}"
        faults.insert(0, (np.ones(len(array), bool), InvalidInput(msg, input_name=spec.name)))
        return None
    if dst.kind == "f" and array.dtype.kind in "iu":
        return array.astype(np.float64)  # by way of float64, so a float16 input's overflow is caught
    if dst.kind not in "iu" or array.dtype == dst:
        return array
    if not np.can_cast(array.dtype, dst):
        info = np.iinfo(dst)
        out = (array < info.min) | (array > info.max)
        if out.any():
            lo, hi = int(array[out].min()), int(array[out].max())
            msg = f"input {spec.name!r}: values {lo}..{hi} in column {name!r} do not fit {dst} [{info.min}, {info.max}]"
            faults.append((out, InvalidInput(msg, input_name=spec.name)))
            array = np.where(out, 0, array)
    return array.astype(dst)


def _typed(arrays: dict[str, Any], signature: Signature) -> Any:
    """The columns cast to the inputs' dtypes by predict's own checks (``Signature.normalize``).

    A batch those checks refuse (a float for an int input, a value out of range, a string)
    is returned as read: submitting it fails, and ``on_error`` bisects it to the failing rows.
    Whole numbers feed a float input (CSV reads them as int64), by way of float64 so a
    float16 input's overflow is caught.
    """
    prepared = {}
    for spec in signature.inputs:
        array = arrays[spec.name]
        if spec.dtype.kind == "f" and array.dtype.kind in "iu":
            array = array.astype(np.float64)
        prepared[spec.name] = array
    try:
        return _single(signature.normalize(prepared))
    except InvalidInput:
        return _single(prepared)


def _single(arrays: Mapping[str, Any]) -> Any:
    return arrays if len(arrays) > 1 else next(iter(arrays.values()))


def _column(column: Any) -> np.ndarray[Any, Any]:
    import pyarrow as pa  # noqa: PLC0415

    values, tail = column, []
    while pa.types.is_fixed_size_list(values.type) and not values.null_count:  # nested: one axis each
        tail.append(values.type.list_size)
        values = values.flatten()
    if len(tail) > 1 and not pa.types.is_nested(values.type):
        return np.asarray(values.to_numpy(zero_copy_only=False)).reshape(len(column), *tail)
    if pa.types.is_fixed_size_list(column.type) or pa.types.is_list(column.type):
        return np.asarray(column.to_pylist()) if column.null_count else np.stack(column.to_numpy(zero_copy_only=False))
    return np.asarray(column.to_numpy(zero_copy_only=False))


def _file_batches(path: Path, batch_size: int, signature: Signature | None, skip: int) -> Iterator[Any]:
    suffix = path.suffix.lower()
    if suffix == ".npy":
        array = _load_npy(path)
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
        one_column = len(reader.schema) == 1
    # In a file of one column a blank line is its row's empty cell: pyarrow skips it by default, which moved
    # every later row up one and read an empty column as no rows at all (Parquet has a null there).
    options = pcsv.ParseOptions(ignore_empty_lines=not one_column)
    with pcsv.open_csv(path, parse_options=options) as reader:
        yield from _rebatch(reader, batch_size, signature, skip, pa)


def _load_npy(path: Path) -> np.ndarray[Any, Any]:
    array: np.ndarray[Any, Any] = np.load(path, mmap_mode="r")
    if array.ndim == 0:
        msg = f"{path} holds a 0-d array (one value, no row axis); save it with a row axis, e.g. x[None]"
        raise InvalidInput(msg)
    return array


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
            return int(_load_npy(path).shape[0])
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
    A file's batch with rows no input takes (a column of another kind, a null for an input
    other than a float one) raises their :class:`~inferkit.InvalidInput`.
    """
    for batch in batches(data, batch_size, signature=signature, skip=skip):
        yield batch.unwrap() if isinstance(batch, _Flawed) else batch


def batches(data: Any, batch_size: int, *, signature: Signature | None = None, skip: int = 0) -> Iterator[Any]:
    """:func:`read`'s batches, a file's flawed ones as a ``_Flawed`` batch.

    ``map`` and ``stream`` refuse those rows one by one with :class:`~inferkit.InvalidInput`,
    as ``on_error`` says, and run the others.
    Each item's NumPy arrays are copied as they are taken: a batch waits in flight while the
    next is read, and a reader that refills one buffer would otherwise change it under it.
    Slices of an array or file read here are not copied again.
    """
    if _is_file(data):
        yield from _file_batches(Path(data), batch_size, signature, skip)
        return
    if isinstance(data, np.ndarray | Mapping | _Flawed):  # _Flawed: a batch this module read, read again (run_job)
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
            yield _owned(_slice(item, start, start + batch_size))
        skip = 0


def _owned(batch: Any) -> Any:
    """A batch from a caller's iterable, its NumPy arrays copied (and lists deep-copied) so map owns it."""
    if isinstance(batch, Mapping):
        return {k: _owned(v) for k, v in batch.items()}
    if isinstance(batch, np.ndarray):
        return np.array(batch)  # plain ndarray, C order, its own memory
    if isinstance(batch, list | tuple):
        return copy.deepcopy(batch)
    return batch
