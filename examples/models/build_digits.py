"""Build ``digits.onnx``, the small default model used by the examples.

Trains a deterministic MLP on scikit-learn's bundled digits dataset (no download),
converts it with skl2onnx to a model with one float32 input ``input`` of shape
``(None, 64)`` and two plain tensor outputs, ``label`` int64 ``(N,)`` and
``probabilities`` float32 ``(N, 10)``, checks with onnxruntime that the ONNX labels
match scikit-learn's on the held-out test split, and writes the file next to this
script.

Run it with ``python examples/models/build_digits.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from skl2onnx import to_onnx
from skl2onnx.common.data_types import FloatTensorType
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

OUTPUT = Path(__file__).with_name("digits.onnx")
SEED = 0


def main() -> int:
    """Train, convert, verify and write the model; return a process exit code."""
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x.astype(np.float32), y.astype(np.int64), test_size=0.25, random_state=SEED
    )
    clf = MLPClassifier(hidden_layer_sizes=(64,), random_state=SEED, max_iter=300)
    clf.fit(x_train, y_train)
    sk_pred = clf.predict(x_test)
    sk_acc = float(np.mean(sk_pred == y_test))

    onx = to_onnx(
        clf,
        initial_types=[("input", FloatTensorType([None, 64]))],
        options={id(clf): {"zipmap": False}},
        target_opset=17,
    )
    onx.graph.name = "digits_mlp"
    data = onx.SerializeToString()

    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    if names != ["label", "probabilities"]:
        print(f"unexpected output names: {names}", file=sys.stderr)
        return 1
    label, proba = sess.run(None, {"input": x_test})
    if label.dtype != np.int64 or proba.dtype != np.float32 or proba.shape != (len(x_test), 10):
        print(
            f"unexpected outputs: {label.dtype} {proba.dtype} {proba.shape}",
            file=sys.stderr,
        )
        return 1
    mismatches = int(np.sum(label != sk_pred))
    if mismatches:
        print(
            f"onnx labels differ from sklearn on {mismatches} test rows",
            file=sys.stderr,
        )
        return 1

    OUTPUT.write_bytes(data)
    print(f"sklearn test accuracy: {sk_acc:.4f} ({len(y_test)} rows)")
    onnx_acc = float(np.mean(label == y_test))
    print(f"onnx test accuracy:    {onnx_acc:.4f} (labels match sklearn)")
    print(f"wrote {OUTPUT} ({len(data)} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
