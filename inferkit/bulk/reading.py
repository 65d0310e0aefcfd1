"""Where bulk rows come from: arrays, ``.npy``/Parquet/CSV files and iterators, read in batches of a size."""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from inferkit.bulk.columns import _Flawed, _once, _slice, _table_batch
from inferkit.errors import InvalidInput
from inferkit.signature import Signature

_FILE_SUFFIXES = (".npy", ".parquet", ".csv")
_READ_BUFFER_BYTES = 1 << 20
_CSV_BLOCK_BYTES = 1 << 20  # pyarrow's own: memory holds about a block of the file at a time
_CSV_LONGEST_BLOCK = 1 << 26  # a row must fit one block: blocks grow 8-fold for a long one, up to this


class _LongRow(InvalidInput):
    """A CSV row longer than the block it was read in (pyarrow's "straddling object"): read in bigger blocks."""


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


def _file_batches(path: Path, batch_size: int, signature: Signature | None, skip: int) -> Iterator[Any]:
    suffix = path.suffix.lower()
    if suffix == ".npy":
        array = _load_npy(path)
        if isinstance(array, np.memmap) and array.flags.c_contiguous:
            yield from _npy_reads(path, array, skip, batch_size)
            return
        for start in range(skip, len(array), batch_size):  # Fortran order: rows are not contiguous in the file
            yield np.array(array[start : start + batch_size])  # read these rows off the map, and only these
        return
    pa = _needs_pyarrow(path.name)
    inputs = [s.name for s in signature.inputs] if signature is not None else []
    if suffix == ".parquet":
        # No pre-buffering and no read-ahead threads: memory holds one row group, not the whole file.
        with _parquet(path, pre_buffer=False, buffer_size=_READ_BUFFER_BYTES) as file:
            _once(file.schema_arrow.names, inputs)
            records = _records(file.iter_batches(batch_size=batch_size, use_threads=False), path, "Parquet")
            yield from _rebatch(records, batch_size, signature, skip, pa)
        return
    yield from _csv_batches(path, batch_size, signature, skip, pa, inputs)


def _csv_batches(
    path: Path, batch_size: int, signature: Signature | None, skip: int, pa: Any, inputs: list[str]
) -> Iterator[Any]:
    """CSV file ``path`` in batches: the inputs' columns parsed per cell, blocks grown for a long row."""
    import pyarrow.csv as pcsv  # noqa: PLC0415

    names = _csv_names(path)
    _once(names, inputs)  # before the read: it takes such columns as one
    text = _text_columns(names, signature)
    convert = pcsv.ConvertOptions()
    if text:
        # The inputs' columns as bytes, parsed cell by cell for their inputs (columns._parsed): typed here, a cell of
        # another kind would end the whole read. Only an unquoted empty cell is null in them; a quoted one is "".
        kinds = dict.fromkeys(text, pa.binary())
        nulls = {"null_values": [""], "strings_can_be_null": True, "quoted_strings_can_be_null": False}
        # Every column when all are features: include_columns takes names, and a repeated one picks its first.
        chosen = {"include_columns": text} if text != names else {}
        convert = pcsv.ConvertOptions(column_types=kinds, **chosen, **nulls)
    # In a file of one column a blank line is its row's empty cell: pyarrow skips it by default, which moved
    # every later row up one and read an empty column as no rows at all (Parquet has a null there).
    parse = pcsv.ParseOptions(ignore_empty_lines=len(names) != 1)
    block = _CSV_BLOCK_BYTES
    while True:
        try:
            with _open_csv(path, block, parse_options=parse, convert_options=convert) as reader:
                for batch in _rebatch(_records(reader, path, "CSV"), batch_size, signature, skip, pa, text=bool(text)):
                    yield batch
                    skip += _rows(batch)
        except _LongRow as error:  # read again in bigger blocks from the first row not yet given
            block = _bigger(block, error)
        else:
            return


def _text_columns(names: list[str], signature: Signature | None) -> list[str]:
    """The CSV columns read as bytes and parsed for the model's inputs, none if it declares none.

    Those named after the inputs, else every column, a one-input model's features. A model that
    declares no inputs gets the types pyarrow infers from the file's first block.
    """
    inputs = [s.name for s in signature.inputs] if signature is not None else []
    if inputs and all(n in names for n in inputs):
        return inputs
    return list(names) if len(inputs) == 1 else []


def _csv_names(path: Path) -> list[str]:
    """The columns CSV file ``path`` names on its first line; ``InvalidInput`` for an empty or unparsable file."""
    block = _CSV_BLOCK_BYTES
    while True:
        try:
            with _open_csv(path, block) as reader:
                return list(reader.schema.names)
        except _LongRow as error:
            block = _bigger(block, error)
        except UnicodeDecodeError as error:  # pyarrow reads the header as bytes; its names decode here
            msg = f"{path} cannot be read as CSV: its header is not UTF-8 ({error})"
            raise InvalidInput(msg) from None


def _bigger(block: int, error: _LongRow) -> int:
    """The next block size after a row longer than ``block``; ``InvalidInput`` past the longest."""
    if block >= _CSV_LONGEST_BLOCK:
        msg = f"{error} (a row longer than {_CSV_LONGEST_BLOCK >> 20} MiB is not read)"
        raise InvalidInput(msg) from None
    return min(block * 8, _CSV_LONGEST_BLOCK)


def _open_csv(path: Path, block: int, **options: Any) -> Any:
    import pyarrow as pa  # noqa: PLC0415
    import pyarrow.csv as pcsv  # noqa: PLC0415

    try:
        return pcsv.open_csv(path, read_options=pcsv.ReadOptions(block_size=block), **options)
    except pa.ArrowInvalid as error:  # "Empty CSV file", a malformed first block, a row longer than a block
        raise _unreadable(path, "CSV", error, block) from None


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _unreadable(path: Path, what: str, error: Exception, block: int | None = None) -> InvalidInput:
    """``InvalidInput`` naming ``path`` for pyarrow's ``error``; a :class:`_LongRow` for a row past its block.

    That is a row straddling two blocks, or (opening the file with ``block``) a first line longer
    than the block, which pyarrow takes for an empty file.
    """
    msg = f"{path} cannot be read as {what}: {error}"
    text = str(error)
    first_line = block is not None and "Empty CSV file or block" in text and _size(path) > block
    return _LongRow(msg) if "straddl" in text or first_line else InvalidInput(msg)


def _parquet(path: Path, **options: Any) -> Any:
    import pyarrow as pa  # noqa: PLC0415
    import pyarrow.parquet as pq  # noqa: PLC0415

    try:
        return pq.ParquetFile(path, **options)
    except pa.ArrowInvalid as error:  # no Parquet footer: not a Parquet file, or one cut short
        msg = f"{path} cannot be read as Parquet: {error}"
        raise InvalidInput(msg) from None


def _records(records: Iterable[Any], path: Path, what: str) -> Iterator[Any]:
    """``records`` as read; ``InvalidInput`` naming ``path`` for one pyarrow cannot read (a line of other columns)."""
    import pyarrow as pa  # noqa: PLC0415

    source = iter(records)
    while True:
        try:
            record = next(source)
        except StopIteration:
            return
        except (pa.ArrowInvalid, OSError) as error:  # OSError: a Parquet page that does not decompress
            raise _unreadable(path, what, error) from None
        yield record


def _load_npy(path: Path) -> np.ndarray[Any, Any]:
    """``path`` memory-mapped; ``InvalidInput`` naming it for a file no .npy, cut short, of objects, or 0-d.

    Checked from the header before NumPy maps it: a file of another kind made ``np.load`` try to unpickle
    it ("contains pickled data"), and one shorter than its header says failed in ``mmap``.
    """
    header = _npy_header(path)
    if header is not None:
        shape, dtype, start = header
        if dtype.hasobject:
            msg = f"{path} holds Python objects ({dtype}), which are never unpickled: save numbers, bools or strings"
            raise InvalidInput(msg)
        need, size = start + math.prod(shape) * dtype.itemsize, path.stat().st_size
        if size < need:
            msg = f"{path} is cut short: its header declares {dtype} of shape {shape}, {need:,} bytes; it has {size:,}"
            raise InvalidInput(msg)
    try:
        array: np.ndarray[Any, Any] = np.load(path, mmap_mode="r")
    except (ValueError, OverflowError, TypeError) as error:  # a format 3.0 header, checked by NumPy alone
        msg = f"{path} cannot be read as a .npy file: {error}"
        raise InvalidInput(msg) from None
    if array.ndim == 0:
        msg = f"{path} holds a 0-d array (one value, no row axis); save it with a row axis, e.g. x[None]"
        raise InvalidInput(msg)
    return array


def _npy_reads(path: Path, mapped: np.memmap[Any, Any], skip: int, batch_size: int) -> Iterator[Any]:
    """Rows of a C-ordered .npy file read by ``read``, not off the map.

    A file cut short meanwhile is ``InvalidInput``, where touching its map past the new end killed
    the process (SIGBUS).
    """
    rows, tail, dtype, offset = len(mapped), mapped.shape[1:], mapped.dtype, mapped.offset
    row_bytes = math.prod(tail) * dtype.itemsize
    with path.open("rb") as f:
        for start in range(skip, rows, batch_size):
            n = min(batch_size, rows - start)
            buffer = bytearray(n * row_bytes)  # writable, owned: the batch may wait in flight while the next is read
            f.seek(offset + start * row_bytes)
            if f.readinto(buffer) != len(buffer):
                msg = f"{path} was cut short while it was read: its header declares {rows:,} rows"
                raise InvalidInput(msg)
            yield np.frombuffer(buffer, dtype).reshape(n, *tail)


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype[Any], int] | None:
    """Shape, dtype and data offset a .npy file's header declares (None for format 3.0, left to NumPy)."""
    fmt = np.lib.format
    try:
        with path.open("rb") as f:
            version = fmt.read_magic(f)
            if version not in {(1, 0), (2, 0)}:
                return None
            read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, _, dtype = read(f)
            start = f.tell()
    except ValueError as error:  # not the magic string (another kind of file), a header cut short or malformed
        msg = f"{path} is not a .npy file NumPy can read: {error}"
        raise InvalidInput(msg) from None
    if not all(type(d) is int and 0 <= d < 2**63 for d in shape):  # (True, 4), (0, 2**70): NumPy's traceback
        msg = f"{path} is not a .npy file NumPy can read: its header declares shape {shape!r:.200}"
        raise InvalidInput(msg)
    return tuple(shape), np.dtype(dtype), start


def _rebatch(
    batches: Iterable[Any], batch_size: int, signature: Signature | None, skip: int, pa: Any, *, text: bool = False
) -> Iterator[Any]:
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
            yield _table_batch(table.slice(0, batch_size).to_batches()[0], signature, text=text)
            rest = table.slice(batch_size)
            held, count = (rest.to_batches() if rest.num_rows else []), rest.num_rows
    if count:
        table = pa.Table.from_batches(held).combine_chunks()
        yield _table_batch(table.to_batches()[0], signature, text=text)


def total_rows(data: Any) -> int | None:
    """Rows in ``data`` when known without reading it (arrays, ``.npy`` and Parquet files)."""
    if _is_file(data):
        path = Path(data)
        suffix = path.suffix.lower()
        if suffix == ".npy":
            return int(_load_npy(path).shape[0])
        if suffix == ".parquet":
            _needs_pyarrow(path.name)
            with _parquet(path) as file:
                return int(file.metadata.num_rows)
        return None
    if isinstance(data, np.ndarray | Mapping):
        return _rows(data)
    return None


def _file_rows(path: Path) -> int | None:
    """:func:`total_rows` of file ``path``, checked before any work.

    ``InvalidInput`` for a suffix no reader takes, or a file that cannot be read (an empty CSV file too).
    """
    if path.suffix.lower() not in _FILE_SUFFIXES:
        msg = f"cannot read {path}: the input must be a .npy, .parquet or .csv file"
        raise InvalidInput(msg)
    if path.suffix.lower() == ".csv":
        _needs_pyarrow(path.name)
        _csv_names(path)
    return total_rows(path)


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
