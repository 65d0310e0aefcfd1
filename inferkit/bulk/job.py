"""Resumable bulk jobs (``inferkit predict``): :func:`run_job` writes chunks, a manifest, then the whole output."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from inferkit.bulk.files import atomic_write, file_identity, output_lock, remove_stale_temporaries
from inferkit.bulk.mapping import Submitter, _check, _progress, check_layout, layout, map_batches
from inferkit.bulk.reading import _file_rows, _needs_pyarrow, _rows, batches
from inferkit.errors import InvalidInput, JobLocked, JobMismatch
from inferkit.signature import Signature

__all__ = ["JobLocked", "JobMismatch", "run_job"]

_COPY_BYTES = 1 << 23  # a .npy output is joined 8 MiB at a time


def _save_part(path: Path, outputs: Any, single: str) -> Path:
    """Write one chunk's outputs under ``path`` with the suffix their kind takes; return the path written.

    Numbers go to ``.npy``/``.npz``; outputs holding objects (strings) to an Arrow IPC ``.arrow``
    file, since NumPy would pickle them and a part read back must never unpickle.
    """
    arrays = outputs if isinstance(outputs, Mapping) else {single: outputs}
    if any(a.dtype.hasobject for a in arrays.values()):
        import pyarrow as pa  # noqa: PLC0415  (only a .parquet output gets here: _check_part)

        table = _arrow_table(outputs, single)
        path = path.with_suffix(".arrow")

        def write(f: BinaryIO) -> None:
            with pa.ipc.new_file(f, table.schema) as writer:
                writer.write_table(table)

    else:
        path = path.with_suffix(".npz" if isinstance(outputs, Mapping) else ".npy")

        def write(f: BinaryIO) -> None:
            if isinstance(outputs, Mapping):
                np.savez(f, **outputs)
            else:
                np.save(f, outputs)

    atomic_write(path, write)
    return path


def _load_part(path: Path) -> Any:
    """A part as written: arrays (never unpickled) or, for ``.arrow``, a pyarrow Table."""
    try:
        if path.suffix == ".arrow":
            import pyarrow as pa  # noqa: PLC0415

            with pa.OSFile(str(path)) as f:
                return pa.ipc.open_file(f).read_all()
        if path.suffix == ".npz":
            with np.load(path) as loaded:
                return {k: loaded[k] for k in loaded.files}
        return np.load(path)
    except ValueError as error:  # a pickled part (written before parts of strings were Arrow files) among them
        msg = f"{path} cannot be read ({error}): delete {path.parent} to start over"
        raise JobMismatch(msg) from None


def _arrow_table(outputs: Any, single: str) -> Any:
    import pyarrow as pa  # noqa: PLC0415

    named = outputs if isinstance(outputs, Mapping) else {single: outputs}
    columns = {}
    for name, array in named.items():
        column = _arrow_values(pa, np.ascontiguousarray(array).ravel())
        if pa.types.is_null(column.type):  # objects all None: text, as a later part's strings are
            column = column.cast(pa.string())
        for width in reversed(array.shape[1:]):  # one fixed-size list per axis past the rows: the shape stays
            column = pa.FixedSizeListArray.from_arrays(column, width)
        columns[name] = column
    return pa.table(columns)


def _arrow_values(pa: Any, flat: np.ndarray[Any, Any]) -> Any:
    """``flat`` as an Arrow array; fixed-width text by value, which pyarrow cut at its first NUL as a C string."""
    if flat.dtype.kind in "US":  # as Python objects: NumPy's own values (trailing NULs are padding to it)
        return pa.array(flat.astype(object), type=pa.string() if flat.dtype.kind == "U" else pa.binary())
    return pa.array(flat)


def _conformed(table: Any, schema: Any, part: Path) -> Any:
    """``table`` cast to the first part's ``schema``; ``ValueError`` saying which part when it cannot be."""
    import pyarrow as pa  # noqa: PLC0415

    try:
        return table.cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, ValueError) as error:
        msg = f"{part.name} holds outputs of other types ({table.schema}) than the first part's ({schema}): {error}"
        raise ValueError(msg) from None


def _several_outputs(names: list[str]) -> ValueError:
    return ValueError(f"the model has several outputs {sorted(names)}: write them to a .parquet file")


def _assemble(parts: list[Path], output: Path, single: str) -> None:
    """Join the finished parts into ``output`` under a temporary name, then rename it."""
    suffix = output.suffix.lower()

    def write(f: BinaryIO) -> None:
        if suffix == ".parquet":
            import pyarrow.parquet as pq  # noqa: PLC0415

            writer = None
            try:
                for part in parts:
                    loaded = _load_part(part)
                    table = loaded if part.suffix == ".arrow" else _arrow_table(loaded, single)
                    if writer is None:
                        writer = pq.ParquetWriter(f, table.schema)
                    elif table.schema != writer.schema:  # an untyped model's objects: str in one part, bytes in another
                        table = _conformed(table, writer.schema, part)
                    writer.write_table(table)
            finally:
                if writer is not None:
                    writer.close()
            return
        rows, tail, dtype = _npy_layout(parts)
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (rows, *tail)}
        np.lib.format.write_array_header_1_0(f, header)  # what np.save writes; the rows follow as they are
        for part in parts:  # one part mapped at a time, copied a block at a time: memory holds no whole output
            _copy_rows(_mapped_part(part), dtype, f)

    atomic_write(output, write)


def _mapped_part(part: Path) -> np.ndarray[Any, Any]:
    """A ``.npy`` part memory-mapped (its pages read as copied); ``JobMismatch`` for one of objects (a pickle)."""
    if part.suffix == ".npz":  # a dict of outputs, left by a job from before they were checked per chunk
        with np.load(part) as loaded:
            raise _several_outputs(list(loaded.files))
    try:
        array: np.ndarray[Any, Any] = np.load(part, mmap_mode="r")
    except ValueError as error:  # "Array can't be memory-mapped: Python objects in dtype"
        msg = f"{part} cannot be read ({error}): delete {part.parent} to start over"
        raise JobMismatch(msg) from None
    return array


def _npy_layout(parts: list[Path]) -> tuple[int, tuple[int, ...], np.dtype[Any]]:
    """The rows, shape past them and dtype of the parts joined, from their headers alone."""
    first = _mapped_part(parts[0])
    tail, dtype, rows = first.shape[1:], first.dtype, 0
    for part in parts:  # each chunk was checked; a job resumed from before was not
        array = _mapped_part(part)
        same = array.dtype == dtype or (array.dtype.kind == dtype.kind and dtype.kind in "US")
        if array.shape[1:] != tail or not same:
            msg = f"{part.name} holds outputs of {array.dtype} {array.shape[1:]}, the first part {dtype} {tail}"
            raise ValueError(msg)
        dtype = np.result_type(dtype, array.dtype)  # text: the widest
        rows += len(array)
    return rows, tail, dtype


def _copy_rows(array: np.ndarray[Any, Any], dtype: np.dtype[Any], f: BinaryIO) -> None:
    """Write ``array``'s rows C-ordered as ``dtype``, ``_COPY_BYTES`` at a time."""
    step = max(1, _COPY_BYTES // max(1, array[:1].nbytes))
    f.writelines(np.ascontiguousarray(array[i : i + step], dtype=dtype).data for i in range(0, len(array), step))


def _settings(source: Path, model: Path | None, chunk_rows: int) -> dict[str, Any]:
    """What a resumed job must match: the input's path, size and mtime, the model's bytes, the chunk size."""
    settings = {
        "input": str(source.resolve()),
        "chunk_rows": chunk_rows,
        "input_file": file_identity(source, digest=False),
    }
    if model is not None:
        settings["model"] = file_identity(model, digest=True)
    return settings


def _resume_from(manifest_path: Path, settings: dict[str, Any]) -> list[dict[str, Any]]:
    """The chunks already done by an unfinished job with the same settings; ``JobMismatch`` for another job's."""
    if not manifest_path.exists():
        return []
    parts_dir = manifest_path.parent
    try:
        manifest = json.loads(manifest_path.read_text())
        found, chunks = manifest["settings"], list(manifest["chunks"])
    except (ValueError, KeyError, TypeError) as error:
        msg = f"{manifest_path} cannot be read ({error}): delete {parts_dir} to start over"
        raise JobMismatch(msg) from None
    if found != settings:
        found = found if isinstance(found, dict) else {}
        other = {k: found.get(k) for k in sorted(set(found) | set(settings)) if found.get(k) != settings.get(k)}
        msg = (
            f"{parts_dir} holds an unfinished job started with another {', '.join(other)} ({other}): "
            "run it with the same model, input and chunk size, or delete that folder to start over"
        )
        raise JobMismatch(msg)
    return chunks


def _check_part(outputs: Mapping[str, tuple[np.dtype[Any], tuple[int | None, ...]]], output: Path) -> None:
    """Refuse outputs (by name: dtype, shape past the rows) that ``output`` could not hold.

    Checked on the declared outputs before any work, then on each chunk's before it is listed.
    """
    for name, (dtype, tail) in outputs.items():
        if output.suffix.lower() == ".npy" and dtype.hasobject:
            msg = f"the model's output {name!r} holds strings, which a .npy file cannot: write it to a .parquet file"
            raise ValueError(msg)
        if output.suffix.lower() == ".parquet" and 0 in tail:  # pyarrow has no fixed-size list of size 0
            shape = ", ".join(["N", *("?" if d is None else str(d) for d in tail)])
            hint = ": write it to a .npy file" if len(outputs) == 1 else ""
            msg = f"the model's output {name!r} has shape ({shape}), no values per row, which Parquet cannot hold{hint}"
            raise ValueError(msg)
    if output.suffix.lower() == ".npy" and len(outputs) > 1:  # an undeclared model's dict: on its first chunk
        raise _several_outputs(list(outputs))


def _check_output(output: Path, signature: Signature | None, source: Path) -> None:
    """Refuse, before any work, an output that could not be written at the end, or that is the input."""
    if _same_file(source, output):  # the final rename replaced the input with the results
        msg = f"the output {output} is the input file {source}; give another output file"
        raise ValueError(msg)
    if output.suffix.lower() not in {".npy", ".parquet"}:
        msg = f"the output must be a .npy or .parquet file, got {output.name}"
        raise ValueError(msg)
    if output.suffix.lower() == ".parquet":
        _needs_pyarrow(output.name)
    if output.is_dir():
        msg = f"the output {output} is a directory; give a file name"
        raise ValueError(msg)
    if output.suffix.lower() == ".npy" and signature is not None and len(signature.outputs) > 1:
        raise _several_outputs([o.name for o in signature.outputs])
    if signature is not None:
        _check_part({o.name: (o.dtype, o.shape[1:]) for o in signature.outputs}, output)
    parts_dir = output.with_name(output.name + ".parts")
    if parts_dir.is_symlink():
        msg = f"{parts_dir} is a symbolic link; a job's parts folder must be a plain folder"
        raise ValueError(msg)


def _same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` are one file (a link or another spelling of its path included)."""
    try:
        return a.samefile(b)
    except OSError:  # either is missing: nothing of the input to overwrite
        return False


def run_job(
    target: Submitter,
    data: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    batch_size: int = 256,
    chunk_rows: int = 65536,
    in_flight: int = 8,
    progress: bool = False,
    model: str | os.PathLike[str] | None = None,
) -> int:
    """Run every row of the file ``data`` and write the results to ``output`` (``.npy`` or ``.parquet``).

    Resumable: each chunk of ``chunk_rows`` rows is written to ``<output>.parts/`` under a
    temporary name, renamed, and only then listed in the manifest there; a job stopped at any
    point (a signal, a crash, a power cut) and run again starts after the last listed chunk.
    ``output`` itself only appears, whole, by a rename once every chunk is done, and the parts
    are then removed. Returns the number of rows written.

    The manifest records the input's path, size and mtime, ``chunk_rows``, and, given
    ``model`` (the file ``target`` was built from), a SHA-256 of the model: a job resumed with
    any of them changed raises :class:`JobMismatch`, as does an input changed while the job runs
    (checked after each chunk, before it is listed). One job at a time writes an output: a
    second raises :class:`JobLocked` (the lock is ``<output>.lock``, released when the job
    ends, a killed one included). An input of another suffix than ``.npy``, ``.parquet`` or ``.csv``,
    one that cannot be read (cut short, empty, not of its suffix's kind) or has no rows raises
    :class:`~inferkit.InvalidInput`, an ``output`` that is the input file ``ValueError``, all before any work.
    """
    _check(batch_size, in_flight, "raise")
    if not isinstance(chunk_rows, int) or chunk_rows < 1:
        msg = f"chunk_rows must be an int >= 1, got {chunk_rows!r}"
        raise ValueError(msg)
    source, output = Path(data), Path(output)
    signature = getattr(target, "signature", None)
    signature = signature if isinstance(signature, Signature) else None
    known_rows = _file_rows(source)  # an unknown suffix, a file cut short or empty, a 0-d .npy: InvalidInput here
    _check_output(output, signature, source)
    if known_rows == 0:  # known without reading for .npy and Parquet
        raise _no_rows(source)
    parts_dir = output.with_name(output.name + ".parts")
    manifest_path = parts_dir / "manifest.json"
    declared = signature.outputs if signature is not None else ()
    single = declared[0].name if len(declared) == 1 else "output"  # a one-output model's column keeps its name
    with output_lock(output):
        settings = _settings(source, None if model is None else Path(model), chunk_rows)
        chunks = _resume_from(manifest_path, settings)
        remove_stale_temporaries(output)
        done_rows = sum(c["rows"] for c in chunks)
        meter = _progress(progress, source)
        if meter is not None:
            meter.done = done_rows
        try:
            for chunk in batches(source, chunk_rows, signature=signature, skip=done_rows):
                first = sum(c["rows"] for c in chunks)
                outputs = map_batches(target, chunk, batch_size=batch_size, in_flight=in_flight, first=first)
                if file_identity(source, digest=False) != settings["input_file"]:  # before the chunk is listed
                    raise _changed(source, parts_dir)
                named = outputs if isinstance(outputs, Mapping) else {single: outputs}
                _check_part({k: (a.dtype, a.shape[1:]) for k, a in named.items()}, output)
                shaped = layout(outputs)
                if chunks and "outputs" in chunks[0]:  # written into the output as the first chunk's: the same, or lost
                    rows = range(first, first + _rows(chunk))
                    check_layout((chunks[0]["outputs"], 0, chunks[0]["rows"] - 1), shaped, rows)
                parts_dir.mkdir(exist_ok=True)  # made with the first part: a job refused before it leaves none
                name = _save_part(parts_dir / f"part-{len(chunks):06d}", outputs, single).name
                chunks.append({"file": name, "rows": _rows(chunk), "outputs": shaped})
                record = json.dumps({"settings": settings, "chunks": chunks}, indent=1).encode()
                atomic_write(manifest_path, lambda f, data=record: f.write(data))  # type: ignore[misc]
                if meter is not None:
                    meter.update(_rows(chunk))
        finally:
            if meter is not None:
                meter.close()
        if not chunks:  # a CSV file of no rows (the others are refused above)
            raise _no_rows(source)
        _assemble([parts_dir / c["file"] for c in chunks], output, single)
        shutil.rmtree(parts_dir)
    return sum(c["rows"] for c in chunks)


def _no_rows(source: Path) -> InvalidInput:
    return InvalidInput(f"{source} has no rows; nothing to predict")


def _changed(source: Path, parts_dir: Path) -> JobMismatch:
    msg = (
        f"{source} changed while the job ran (its size or mtime): the chunks done read the old one; "
        f"delete {parts_dir} and run the job again"
    )
    return JobMismatch(msg)
