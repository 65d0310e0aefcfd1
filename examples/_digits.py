"""The digits model and test split shared by the examples.

``MODEL`` is built by ``models/build_digits.py``; ``test_split`` returns the held-out
rows that script scores the model on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

__all__ = ["MODEL", "test_split"]

MODEL = Path(__file__).parent / "models" / "digits.onnx"
SEED = 0


def test_split() -> tuple[np.ndarray, np.ndarray]:
    """Return the test split: float32 features ``(N, 64)`` and int64 labels ``(N,)``."""
    x, y = load_digits(return_X_y=True)
    _, x_test, _, y_test = train_test_split(x.astype(np.float32), y.astype(np.int64), test_size=0.25, random_state=SEED)
    return np.ascontiguousarray(x_test), np.ascontiguousarray(y_test)
