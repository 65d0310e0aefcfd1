"""An ONNX backend's runs on CuPy arrays on a GPU: inputs and outputs bound in device memory, no host copy.

It owns the CUDA stream ONNX Runtime computes on and what the first run learns: the outputs
whose shape past the batch axis is fixed, which later runs bind to memory allocated here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from inferkit.signature import Signature

__all__ = ["DeviceBinding", "new_stream"]

_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(uint16)": np.uint16, "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64, "tensor(bool)": np.bool_,
}  # fmt: skip


def new_stream(gpu: int) -> Any:
    """A non-blocking CuPy stream on GPU ``gpu`` for ONNX Runtime to compute on; ``None`` without CuPy."""
    try:
        import cupy  # noqa: PLC0415  (optional: without it, no I/O binding to device memory)
    except ImportError:
        return None
    with cupy.cuda.Device(gpu):
        return cupy.cuda.Stream(non_blocking=True)


class DeviceBinding:
    """I/O-binding runs of a session on GPU ``gpu``: CuPy arrays in, CuPy arrays out.

    ``stream`` is the CuPy stream the session computes on (its ``user_compute_stream``), or
    ``None`` when it computes on one of its own.
    """

    __slots__ = ("_gpu", "_outputs", "_row_shapes", "_run_options", "_specs", "stream")

    def __init__(self, signature: Signature, gpu: int, stream: Any) -> None:
        self._specs = signature.outputs
        self._outputs = [o.name for o in signature.outputs]
        self._gpu = gpu
        self.stream = stream
        self._run_options: Any = None
        if stream is not None:
            import onnxruntime as ort  # noqa: PLC0415  (optional extra)

            # ORT computes on our stream, so the caller's next kernels are ordered after it: no sync.
            self._run_options = ort.RunOptions()
            self._run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        self._row_shapes: dict[str, tuple[int, ...]] | None = None  # see _learn_row_shapes

    def run(self, session: Any, inputs: Mapping[str, Any]) -> Mapping[str, Any]:
        """Run ``session`` on CuPy ``inputs`` bound in place; its outputs as CuPy arrays on the GPU."""
        import cupy as cp  # noqa: PLC0415  (CuPy arrays came in, so it is installed)

        gpu = self._gpu
        with cp.cuda.Device(gpu):
            binding = session.io_binding()
            held = []  # the bound arrays must outlive the run
            for name, value in inputs.items():
                arr = cp.ascontiguousarray(value)
                held.append(arr)
                binding.bind_input(name, "cuda", gpu, arr.dtype.type, list(arr.shape), arr.data.ptr)
            rows = held[0].shape[0]
            known = self._row_shapes
            outputs: dict[str, Any] = {}
            for spec in self._specs:
                shape = None if known is None else known.get(spec.name)
                if shape is None:
                    binding.bind_output(spec.name, "cuda", gpu)  # ORT allocates; wrapped after the run
                    continue
                out = outputs[spec.name] = cp.empty((rows, *shape), spec.dtype)
                binding.bind_output(spec.name, "cuda", gpu, spec.dtype.type, list(out.shape), out.data.ptr)
            current = cp.cuda.get_current_stream()
            if self.stream is None or current.ptr != self.stream.ptr:
                # ORT reads the inputs on its own stream: what the caller's stream wrote must be done.
                current.synchronize()
                session.run_with_iobinding(binding)  # ORT synchronises its stream at the end
            else:
                session.run_with_iobinding(binding, self._run_options)
            if len(outputs) < len(self._outputs):
                for name, value in zip(self._outputs, binding.get_outputs(), strict=True):
                    outputs.setdefault(name, _cupy_view(cp, value, gpu))
                if known is None:
                    self._row_shapes = self._learn_row_shapes(outputs, rows)
            return {name: outputs[name] for name in self._outputs}

    def _learn_row_shapes(self, outputs: Mapping[str, Any], rows: int) -> dict[str, tuple[int, ...]]:
        """The outputs later runs bind to memory allocated here, and their shapes past the batch axis.

        Those whose model shape past the batch axis is fixed and that this first run gave with one
        row per input row: no ``OrtValue`` to wrap after each run, and ORT's output lookup skipped.
        """
        learned = {}
        for spec in self._specs:
            out = outputs[spec.name]
            fixed = all(d is not None for d in spec.shape[1:])
            if fixed and out.dtype == spec.dtype and out.shape == (rows, *spec.shape[1:]):
                learned[spec.name] = tuple(out.shape[1:])
        return learned


def _cupy_view(cp: Any, value: Any, gpu: int) -> Any:
    """A CuPy array over an ``OrtValue``'s device memory, no copy; the array keeps the value alive."""
    dtype = np.dtype(_ORT_TYPES[value.data_type()])
    shape = tuple(value.shape())
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    memory = cp.cuda.UnownedMemory(value.data_ptr(), nbytes, value, gpu)
    return cp.ndarray(shape, dtype, cp.cuda.MemoryPointer(memory, 0))
