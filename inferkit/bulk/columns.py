"""A file's record batch as the model's arrays: each column checked against its input, flawed rows stood in for.

A CSV file's columns for a model that declares its inputs are read as bytes and parsed here,
cell by cell (:func:`_parsed`), so a cell its input cannot take fails its own row, not the file.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import numpy as np

from inferkit.errors import InvalidInput
from inferkit.signature import _FAMILY, Signature, TensorSpec


def _slice(batch: Any, start: int, stop: int) -> Any:
    if isinstance(batch, Mapping):
        return {k: v[start:stop] for k, v in batch.items()}
    return batch[start:stop]


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

    def at_row(self, error: BaseException, first: int) -> InvalidInput | None:
        """``error``, as :meth:`unwrap` raised it, naming its first row (``first`` is this batch's), else None.

        None too when every row has it: a column of the wrong kind, which no row can mend.
        """
        for mask, fault in self.faults:
            if mask.any():
                if fault is not error or mask.all():
                    return None
                row = first + int(mask.argmax())
                return InvalidInput(f"row {row} (counted from 0): {fault}", input_name=fault.input_name)
        return None

    def whole(self) -> InvalidInput | None:
        """The error of a fault every row has first (no slice of these rows could pass), else None.

        First, as :meth:`unwrap` raises it: a row may have two (a cell that is no number, stood in
        by a null, then that null), and each row is refused with its first.
        """
        first = next(((mask, error) for mask, error in self.faults if mask.any()), None)
        return first[1] if first is not None and first[0].all() else None


def _flawed(batch: Any, faults: list[tuple[np.ndarray[Any, Any], InvalidInput]]) -> Any:
    return _Flawed(batch, tuple(faults)) if faults else batch


def _table_batch(batch: Any, signature: Signature | None, *, text: bool = False) -> Any:
    """Arrays for the model from a pyarrow RecordBatch.

    Columns named after the model's inputs feed those inputs (a list column becomes a 2-D
    array); a one-input model whose input has no column of its name takes every column,
    stacked in file order, as its features. Each column is checked against the input before
    it is stacked (stacking would promote a bool or an int to a float, or fail on a date);
    a column no input takes, or a null fed to an input other than a float one, flaws its rows.
    With ``text``, the inputs' columns were read as bytes (a CSV file's) and are parsed first.
    """
    names = list(batch.schema.names)
    inputs = [s.name for s in signature.inputs] if signature is not None else []
    faults: list[tuple[np.ndarray[Any, Any], InvalidInput]] = []
    if signature is not None and all(n in names for n in inputs):
        columns = {s.name: batch.column(names.index(s.name)) for s in signature.inputs}
        if text:
            columns = {s.name: _parsed(s.name, columns[s.name], s, faults) for s in signature.inputs}
        arrays = {s.name: _named(s.name, columns[s.name], s, faults) for s in signature.inputs}
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
        read = _parsed(name, column, spec, faults) if text else column
        feature = _feature(name, _no_nulls(name, read, spec, faults), spec, faults)
        if feature is None:
            return _Flawed(None, tuple(faults))
        features.append(feature)
    return _flawed(_typed({spec.name: np.column_stack(features)}, signature), faults)


def _once(names: list[str], inputs: list[str]) -> None:
    """``InvalidInput`` when an input's name heads two columns: the first fed it, silently."""
    twice = sorted({n for n in inputs if names.count(n) > 1})
    if twice:
        msg = f"the file has more than one column named {twice[0]!r}, an input of the model; name each once"
        raise InvalidInput(msg)


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
    if pa.types.is_dictionary(column.type):  # Parquet's dictionary-encoded strings: the values, nulls kept
        column = column.dictionary_decode()
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


# What a cell read as text must be for an input of each kind (numbers by way of the widest type of their kind)
_PARSED_AS: dict[str, tuple[str, str]] = {
    "f": ("float64", "a number"),
    "i": ("int64", "a whole number (int64)"),
    "u": ("uint64", "a whole number >= 0 (uint64)"),
    "b": ("bool", "true or false (or 1 or 0)"),
}
_NAMED_VALUES = 8  # bad values of a column in a batch named one by one; the rest share one error


def _parsed(name: str, column: Any, spec: TensorSpec, faults: list[tuple[np.ndarray[Any, Any], InvalidInput]]) -> Any:
    """Column ``name`` of a CSV file, read as bytes, as input ``spec``'s kind; a cell that is none flaws its row.

    pyarrow's CSV reader infers a column's type from the file's first block and ends the whole
    read at a later cell that type cannot hold (``2.5`` after whole numbers); read as bytes, no
    cell can. Text that is not UTF-8 flaws its row. A string input takes each cell as it is
    (digits keep their leading zeros; an unquoted empty cell is the reader's null). For numbers and
    bools, pyarrow's null markers (``NA``, ``NULL``, ``NaN``, an empty cell, quoted or not) are nulls,
    space around a value is dropped, and a cell that is not one flaws its row, naming the value.
    """
    import pyarrow as pa  # noqa: PLC0415
    import pyarrow.compute as pc  # noqa: PLC0415
    import pyarrow.csv as pcsv  # noqa: PLC0415

    strings = _cast_cells(name, column, pa.string(), "UTF-8 text", spec, faults)
    if spec.dtype.kind not in _PARSED_AS:
        return strings
    kind, what = _PARSED_AS[spec.dtype.kind]
    trimmed = pc.utf8_trim_whitespace(strings)  # " NA " is a null marker too
    markers = pc.is_in(trimmed, value_set=pa.array(pcsv.ConvertOptions().null_values, pa.string()))
    cells = pc.if_else(markers, pa.scalar(None, pa.string()), trimmed)
    if spec.dtype.kind in "iu":  # whole numbers in ASCII decimal: "+5" is 5, "-0" is 0 (a uint too), "0x10" is none
        cells = pc.replace_substring_regex(cells, pattern=r"^\+([0-9])", replacement=r"\1")
        cells = pc.replace_substring_regex(cells, pattern=r"^-(0+)$", replacement=r"\1")
        hexadecimal = pc.fill_null(pc.match_substring_regex(cells, r"^[+-]?0[xX]"), fill_value=False)
        if pc.any(hexadecimal).as_py():
            first = _shown(cells.filter(hexadecimal)[0].as_py())
            msg = f"input {spec.name!r}: expected {spec.describe()}, got {first} in column {name!r}, not in decimal"
            faults.append((hexadecimal.to_numpy(zero_copy_only=False), InvalidInput(msg, input_name=spec.name)))
            cells = pc.if_else(hexadecimal, pa.scalar(None, pa.string()), cells)
    parsed = _cast_cells(name, cells, pa.type_for_alias(kind), what, spec, faults)
    if kind != "float64":
        return parsed
    # "1e400" parses as inf: past float64, as "1e39" is past float32 (refused), unless it spells an infinity
    past = pc.and_(pc.is_inf(parsed), pc.invert(pc.match_substring_regex(cells, r"^[+-]?(?i:inf|infinity)$")))
    mask = pc.fill_null(past, fill_value=False).to_numpy(zero_copy_only=False)
    if not mask.any():
        return parsed
    first = _shown(cells.filter(pa.array(mask))[0].as_py())
    msg = f"input {spec.name!r}: expected {spec.describe()}, got {first} in column {name!r}, past float64's range"
    faults.append((mask, InvalidInput(msg, input_name=spec.name)))
    return pc.if_else(pa.array(mask), pa.scalar(None, parsed.type), parsed)


def _cast_cells(
    name: str,
    column: Any,
    kind: Any,
    what: str,
    spec: TensorSpec,
    faults: list[tuple[np.ndarray[Any, Any], InvalidInput]],
) -> Any:
    """``column`` cast to Arrow type ``kind``; a row whose cell cannot be is flawed (its value named) and null."""
    import pyarrow as pa  # noqa: PLC0415
    import pyarrow.compute as pc  # noqa: PLC0415

    try:
        return column.cast(kind)
    except pa.ArrowInvalid:
        pass
    bad = _uncastable(pc.unique(column.drop_null()), kind)
    head = f"input {spec.name!r}: expected {spec.describe()}, got"
    for value in bad[:_NAMED_VALUES]:
        mask = pc.fill_null(pc.equal(column, pa.scalar(value, column.type)), fill_value=False)
        msg = f"{head} {_shown(value)} in column {name!r}, which is not {what}"
        faults.append((mask.to_numpy(zero_copy_only=False), InvalidInput(msg, input_name=spec.name)))
    if len(bad) > _NAMED_VALUES:
        rest = bad[_NAMED_VALUES:]
        mask = pc.is_in(column, value_set=pa.array(rest, column.type))
        msg = f"{head} {len(rest)} more values in column {name!r} that are not {what}, such as {_shown(rest[0])}"
        faults.append((mask.to_numpy(zero_copy_only=False), InvalidInput(msg, input_name=spec.name)))
    flawed = pc.is_in(column, value_set=pa.array(bad, column.type))
    return pc.if_else(flawed, pa.scalar(None, column.type), column).cast(kind)


def _uncastable(values: Any, kind: Any) -> list[Any]:
    """The ``values`` (distinct, no nulls) that cannot be cast to ``kind``, found by halves: few bad, few casts."""
    import pyarrow as pa  # noqa: PLC0415

    try:
        values.cast(kind)
    except pa.ArrowInvalid:
        if len(values) == 1:
            return [values[0].as_py()]
        half = len(values) // 2
        return _uncastable(values.slice(0, half), kind) + _uncastable(values.slice(half), kind)
    return []


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:36]}...{text[-1]}"
