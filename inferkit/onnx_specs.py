"""The tensor specs of an ONNX Runtime session's inputs and outputs: :meth:`Signature.from_onnx`'s reading."""

from __future__ import annotations

from typing import Any, Final

import numpy as np

from inferkit.signature import TensorSpec

__all__ = ["onnx_specs"]

_ONNX_DTYPES: Final = {
    f"tensor({name})": np.dtype(dtype)
    for name, dtype in [
        ("float", "float32"), ("double", "float64"), ("float16", "float16"),
        ("int8", "int8"), ("int16", "int16"), ("int32", "int32"), ("int64", "int64"),
        ("uint8", "uint8"), ("uint16", "uint16"), ("uint32", "uint32"),
        ("uint64", "uint64"), ("bool", "bool"), ("string", "object"),
    ]
}  # fmt: skip


def onnx_specs(session: Any) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The input and output specs of ``session`` (anything with ``get_inputs()``/``get_outputs()``).

    ``ValueError`` for an input or output that is no supported tensor or has no batch axis.
    """
    inputs = [_onnx_spec(arg, "input") for arg in session.get_inputs()]
    for arg in session.get_outputs():
        if not str(arg.type).startswith("tensor("):
            msg = (
                f"model output {arg.name!r} is a {arg.type}, not a tensor, and cannot be returned; "
                "export the model with tensor outputs only (skl2onnx: "
                "to_onnx(model, X, options={'zipmap': False}) gives probabilities as a float tensor)"
            )
            raise ValueError(msg)
    outputs = [_onnx_spec(arg, "output") for arg in session.get_outputs()]
    return inputs, outputs


def _onnx_spec(arg: Any, role: str) -> TensorSpec:
    dtype = _ONNX_DTYPES.get(arg.type)
    if dtype is None:
        raise ValueError(f"model {role} {arg.name!r} has unsupported type {arg.type}")
    dims = list(arg.shape or ())
    if not dims:
        msg = f"model {role} {arg.name!r} has rank 0 (or a rank ONNX Runtime cannot tell); inferkit needs a batch axis"
        raise ValueError(msg)
    # A str is a symbolic dim; None (or -1 from some exporters) an unknown one.
    tail = (d if type(d) is int and d >= 0 else None for d in dims[1:])
    return TensorSpec(arg.name, dtype, (None, *tail))
