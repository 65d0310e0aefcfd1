"""A scripted model for the batcher and predictor tests: gated, poisonable, recording."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np

BLOCK = -1.0  # a row whose first value is BLOCK holds its batch until ``release`` is set
POISON = -2.0  # a row whose first value is POISON makes the model raise
HANG = -3.0  # like BLOCK, but released by ``unhang`` (for execution-timeout tests)


class Model:
    """``y = 2 x``, recording every batch; BLOCK/HANG rows wait on events, POISON rows raise."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.batches: list[np.ndarray[Any, Any]] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.unhang = threading.Event()
        self.fail = threading.Event()  # when set, every call raises

    def __call__(self, x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        with self.lock:
            self.batches.append(x.copy())
        first = x[:, 0]
        if (first == BLOCK).any():
            self.entered.set()
            assert self.release.wait(30)
        if (first == HANG).any():
            self.entered.set()
            assert self.unhang.wait(30)
        if self.fail.is_set():
            msg = "replica broken"
            raise RuntimeError(msg)
        if (first == POISON).any():
            msg = "poisoned row"
            raise ValueError(msg)
        return x * 2

    def seen(self) -> np.ndarray[Any, Any]:
        """Every first-column value the model has been called with."""
        with self.lock:
            return np.concatenate([b[:, 0] for b in self.batches]) if self.batches else np.zeros(0)


def fails_once() -> Callable[[np.ndarray[Any, Any]], np.ndarray[Any, Any]]:
    """``y = 2 x``, except that its first call, on whichever replica, raises."""
    first = threading.Event()

    def model(x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        if not first.is_set():
            first.set()
            msg = "first call anywhere fails"
            raise RuntimeError(msg)
        return x * 2

    return model


def rows(value: float, n: int = 1, width: int = 3) -> np.ndarray[Any, Any]:
    """``n`` rows of ``width`` columns whose first value is ``value``."""
    x = np.full((n, width), 1.0)
    x[:, 0] = value
    return x
