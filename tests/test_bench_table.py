"""benchmarks/bench_batching.py's table: the ratios it notes must be what the cells measured."""

from __future__ import annotations

from types import ModuleType

import pytest
from bench_modules import load


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load("bench_batching")


def _row(bench: ModuleType, name: str, rows_per_s: float) -> object:
    return bench.Row(name, "32 x 1", "1", bench.CellResult(rows_per_s, 1.0, 2.0, 100, 1.0))


def test_inferkit_rows_are_set_against_the_model_alone_on_their_sessions_threads(bench: ModuleType) -> None:
    """1-row against the limit's cell at batch 64 on the narrow session's threads, 8-row on the wide one's;
    no note where the limit row did not measure that cell."""
    limit = _row(bench, "limit", 400.0)
    limit.model_alone = {(bench.MAX_BATCH, 1): 100.0, (bench.MAX_BATCH, 2): 200.0}
    one, eight = _row(bench, "inferkit 1-row", 50.0), _row(bench, "inferkit 8-row", 180.0)
    bench.add_model_ratio([limit, one, eight], 1, 2)
    assert one.notes == [f"0.50x the model alone at batch {bench.MAX_BATCH}, intra 1"]
    assert eight.notes == [f"0.90x the model alone at batch {bench.MAX_BATCH}, intra 2"]
    other = _row(bench, "inferkit 1-row", 50.0)
    bench.add_model_ratio([limit, other], 3, 4)  # a machine whose sessions have threads the limit did not try
    assert other.notes == []
