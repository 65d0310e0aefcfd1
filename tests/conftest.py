"""Fixtures shared by every test: tiny ONNX models and a guard against leaked threads."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 9  # onnxruntime 1.32 reads up to IR 11; 9 is what opset 17 shipped with
THREAD_EXIT_S = 5.0

MLP_WEIGHT = (np.arange(12, dtype=np.float32).reshape(4, 3) - 5.5) / 4
MLP_BIAS = np.array([0.5, -1.0, 2.0], dtype=np.float32)


def _model(graph: onnx.GraphProto) -> bytes:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


@pytest.fixture(name="mlp_weights")
def _mlp_weights() -> tuple[np.ndarray, np.ndarray]:
    """The weight (4x3) and bias (3,) baked into ``mlp_model``: ``y = x @ weight + bias``."""
    return MLP_WEIGHT.copy(), MLP_BIAS.copy()


@pytest.fixture(name="mlp_model")
def _mlp_model() -> bytes:
    """One linear layer: input "x" float32 [N, 4] -> output "y" float32 [N, 3]."""
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "B"], ["y"]),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        initializer=[numpy_helper.from_array(MLP_WEIGHT, "W"), numpy_helper.from_array(MLP_BIAS, "B")],
    )
    return _model(graph)


@pytest.fixture(name="two_outputs_model")
def _two_outputs_model() -> bytes:
    """Input "x" float32 [N, 4] -> "y" = x * 2 [N, 4] and "s" = row sums of x [N]."""
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "two"], ["y"]),
            helper.make_node("ReduceSum", ["x", "axes"], ["s"], keepdims=0),
        ],
        "two_outputs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, ["N"]),
        ],
        initializer=[
            numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "axes"),
        ],
    )
    return _model(graph)


def _inferkit_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("inferkit-") and t.is_alive()}


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves an ``inferkit-*`` thread running once it is over.

    Threads get up to 5 s to exit. Threads that were already alive before the test are left to
    the test that started them, so one leak is reported once.
    """
    before = _inferkit_threads()
    yield
    end = time.monotonic() + THREAD_EXIT_S
    leaked = _inferkit_threads() - before
    for thread in leaked:
        thread.join(max(end - time.monotonic(), 0.0))
    alive = sorted(t.name for t in leaked if t.is_alive())
    assert not alive, f"inferkit threads still running {THREAD_EXIT_S} s after the test: {alive}"


@pytest.fixture(autouse=True)
def _logging_restored() -> Iterator[None]:
    """Undo what a test's in-process ``inferkit serve`` (``cli.main``) did to global logging.

    The command configures structlog and the root logger, as an application may; the test
    process must not keep that configuration for the tests that follow.
    """
    import logging

    import structlog

    config = structlog.get_config()
    root = logging.getLogger()
    handlers = list(root.handlers)
    levels = {name: logging.getLogger(name).level for name in ("", "inferkit", "inferkit.access")}
    yield
    structlog.configure(**config)
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
