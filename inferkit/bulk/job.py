"""Resumable bulk jobs (``inferkit predict``): :func:`run_job` writes chunks, a manifest, then the whole output."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from inferkit.bulk.mapping import Submitter, _check, _progress, map_batches
from inferkit.bulk.reading import _needs_pyarrow, _rows, read
from inferkit.signature import Signature


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
