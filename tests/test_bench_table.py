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


def test_each_row_is_also_set_against_the_limit_of_its_own_round(bench: ModuleType) -> None:
    """With several rounds, a throughput row notes its share of each round's own limit, and their median."""
    rounds = [
        [_row(bench, "limit", 100.0), _row(bench, "inferkit 8-row", 90.0)],
        [_row(bench, "limit", 120.0), _row(bench, "inferkit 8-row", 96.0)],
        [_row(bench, "limit", 110.0), _row(bench, "inferkit 8-row", 77.0)],
    ]
    rows = bench.combine_rounds(rounds)
    bench.add_round_shares(rounds, rows)
    by_name = {r.name: r for r in rows}
    assert "share of its round's limit 90%, 80%, 70% (median 80%)" in by_name["inferkit 8-row"].notes
    assert not any("its round" in n for n in by_name["limit"].notes)
    single = [[_row(bench, "limit", 100.0), _row(bench, "inferkit 8-row", 90.0)]]
    bench.add_round_shares(single, single[0])
    assert not any("its round" in n for r in single[0] for n in r.notes)
