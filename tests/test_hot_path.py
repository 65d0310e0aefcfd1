"""benchmarks/hot_path.py, the repeatable measure of a request's cost: it must count what it claims."""

from __future__ import annotations

from types import ModuleType

import pytest
from bench_modules import load


@pytest.fixture(scope="module")
def hot_path() -> ModuleType:
    return load("hot_path")


def test_a_lone_predict_counts_the_same_every_time(hot_path: ModuleType) -> None:
    """The lone path's count repeats exactly (so it can compare two trees); it ran on the caller's thread."""
    (first, on_worker), (second, _) = hot_path.measure(["lone"])["lone"], hot_path.measure(["lone"])["lone"]
    assert sum(first.values()) == sum(second.values()) > 0
    assert first[("caller.py", "_run_alone")] > 0
    assert not on_worker


def test_a_queued_request_is_counted_in_the_workers_thread_too(hot_path: ModuleType) -> None:
    """Per queued request, the batch formation and accounting done on the replica's worker thread
    count, and are told apart as the worker's (the serial part); the caller's share is not."""
    for name, (counts, on_worker) in hot_path.measure(["queued", "queued-async"]).items():
        assert counts[("lane.py", "form")] == on_worker[("lane.py", "form")] > 0, name  # the worker's share
        assert counts[("batcher.py", "_succeeded")] == on_worker[("batcher.py", "_succeeded")] > 0, name
        assert counts[("predictor.py", "_request")] > 0, name  # the caller's share
        assert on_worker[("predictor.py", "_request")] == 0, name
        assert sum(counts.values()) > sum(on_worker.values()), name


def test_the_round_robin_path_counts_the_balancers_choice_of_one_busy_queue(hot_path: ModuleType) -> None:
    """Each queued request passes ``lane_for``; the idle second replica, which would crowd the
    busy one, runs nothing (its share would make the count depend on timing)."""
    counts, _ = hot_path.measure(["queued-rr"])["queued-rr"]
    assert counts[("replicas.py", "lane_for")] > 0
    assert counts[("lane.py", "form")] > 0
    assert counts[("caller.py", "run_inline")] == 0  # no caller ran a batch on the idle replica
