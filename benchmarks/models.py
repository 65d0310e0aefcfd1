"""Models the benchmarks run, built in memory with the ``onnx`` package.

``mlp_bytes()`` returns a serialized float32 MLP ``256 -> 1024 -> 1024 -> 10``:
two ``MatMul + Add + Relu`` hidden layers and a ``MatMul + Add`` output layer
(logits). The batch dimension is symbolic (``"batch"``), so one session serves
any number of rows. Weights come from a fixed-seed generator and are scaled by
``1/sqrt(fan_in)`` so activations stay O(1) and outputs are finite.

``identity_bytes(width)`` returns an Identity model over float32 rows of ``width``: a model
that costs next to nothing, for measuring what inferkit adds around a call.

The MLP is small enough that one row costs tens to hundreds of microseconds
and large enough (about 1.3 M multiply-adds per row, 5 MiB of weights) that
batching rows into one ``session.run`` pays off clearly on a CPU, which is what
the batching benchmarks need.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["INPUT_DIM", "INPUT_NAME", "OUTPUT_DIM", "OUTPUT_NAME", "identity_bytes", "mlp_bytes"]

INPUT_NAME = "x"
OUTPUT_NAME = "y"
INPUT_DIM = 256
HIDDEN_DIMS = (1024, 1024)
OUTPUT_DIM = 10
SEED = 0
# Opset 17 / IR 9 load in every onnxruntime the project supports (>= 1.18).
OPSET = 17
IR_VERSION = 9


def mlp_bytes() -> bytes:
    """Serialized ONNX MLP ``256 -> 1024 -> 1024 -> 10`` (float32, symbolic batch)."""
    rng = np.random.default_rng(SEED)
    dims = (INPUT_DIM, *HIDDEN_DIMS, OUTPUT_DIM)
    nodes: list[onnx.NodeProto] = []
    initializers: list[onnx.TensorProto] = []
    current = INPUT_NAME
    n_layers = len(dims) - 1
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(dims)):
        last = i == n_layers - 1
        weight = rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)
        bias = 0.01 * rng.standard_normal(fan_out)
        w_name, b_name = f"w{i}", f"b{i}"
        initializers.append(numpy_helper.from_array(weight.astype(np.float32), w_name))
        initializers.append(numpy_helper.from_array(bias.astype(np.float32), b_name))
        matmul_out, add_out = f"h{i}_matmul", OUTPUT_NAME if last else f"h{i}_add"
        nodes.append(helper.make_node("MatMul", [current, w_name], [matmul_out]))
        nodes.append(helper.make_node("Add", [matmul_out, b_name], [add_out]))
        current = add_out
        if not last:
            relu_out = f"h{i}"
            nodes.append(helper.make_node("Relu", [add_out], [relu_out]))
            current = relu_out

    graph = helper.make_graph(
        nodes,
        "mlp",
        inputs=[helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", INPUT_DIM])],
        outputs=[helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", OUTPUT_DIM])],
        initializer=initializers,
    )
    model = helper.make_model(
        graph,
        producer_name="inferkit-benchmarks",
        opset_imports=[helper.make_opsetid("", OPSET)],
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    data: bytes = model.SerializeToString()
    return data


def identity_bytes(width: int) -> bytes:
    """Serialized ONNX Identity model over float32 rows of ``width`` (symbolic batch)."""
    graph = helper.make_graph(
        [helper.make_node("Identity", [INPUT_NAME], [OUTPUT_NAME])],
        "identity",
        inputs=[helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", width])],
        outputs=[helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", width])],
    )
    model = helper.make_model(
        graph, producer_name="inferkit-benchmarks", opset_imports=[helper.make_opsetid("", OPSET)]
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    data: bytes = model.SerializeToString()
    return data
