"""benchmarks/lean_batcher.py, the bench's yardstick: with nothing else to it, it must at least be right."""

from __future__ import annotations

import threading
from types import ModuleType

import numpy as np
import onnxruntime as ort
import pytest
from bench_modules import load


@pytest.fixture(scope="module")
def lean() -> ModuleType:
    return load("lean_batcher")


def test_every_caller_gets_its_own_rows_in_batches_of_at_most_max_rows(lean: ModuleType, mlp_model: bytes) -> None:
    """16 threads of 1-3 rows: each answer is ``session.run`` of its own input; batches formed (fewer
    batches than calls) and none over ``max_rows``; ``close`` returns with every caller answered."""
    session = ort.InferenceSession(mlp_model, providers=["CPUExecutionProvider"])
    batcher = lean.LeanBatcher(session, max_rows=5)
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((1 + i % 3, 4)).astype(np.float32) for i in range(16)]
    wrong: list[int] = []
    calls = 40

    def client(i: int) -> None:
        want = session.run(None, {"x": inputs[i]})[0]
        for _ in range(calls):
            if not np.allclose(batcher.predict(inputs[i]), want, rtol=1e-5):
                wrong.append(i)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    batcher.close()
    assert wrong == []
    assert batcher.rows == calls * sum(len(x) for x in inputs)
    assert batcher.batches < 16 * calls
    assert batcher.rows <= 5 * batcher.batches
    with pytest.raises(RuntimeError, match="closed"):
        batcher.predict(inputs[0])
