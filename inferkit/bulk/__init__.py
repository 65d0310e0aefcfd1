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

The package: ``reading`` (sources, read in batches), ``columns`` (a file's columns checked and
cast for the model's inputs, a CSV file's cell by cell), ``mapping`` (:func:`map_batches`,
:func:`stream_batches`), ``progress`` (:class:`Progress`), ``job`` (:func:`run_job`, resumable)
and ``files`` (the output's lock, and writes that appear whole or not at all).
"""

from __future__ import annotations

from inferkit.bulk.job import JobLocked, JobMismatch, run_job
from inferkit.bulk.mapping import BulkPart, BulkResult, OnError, RowError, Submitter, map_batches, stream_batches
from inferkit.bulk.progress import Progress
from inferkit.bulk.reading import read, total_rows

__all__ = [
    "BulkPart",
    "BulkResult",
    "JobLocked",
    "JobMismatch",
    "OnError",
    "Progress",
    "RowError",
    "Submitter",
    "map_batches",
    "read",
    "run_job",
    "stream_batches",
    "total_rows",
]
