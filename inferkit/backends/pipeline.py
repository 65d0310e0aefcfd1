"""A backend wrapped with its pipeline: pre-processing, the model and post-processing in one batch call."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Mapping
from typing import Any

import attrs
import numpy as np

from inferkit.arrays import array_module
from inferkit.backends.base import Backend, cpu_threads
from inferkit.backends.device import DeviceFallbackWarning, DeviceLost, DeviceOutOfMemory, classify, device_id
from inferkit.gpu.pipeline import Pipeline
from inferkit.gpu.step import CPU, Kit
from inferkit.signature import Signature

__all__ = ["PipelineBackend", "Transfers"]


@attrs.define
class Transfers:
    """Host-device copies this backend made: ``h2d`` uploads and ``d2h`` downloads, and their bytes."""

    h2d: int = 0
    d2h: int = 0
    h2d_bytes: int = 0
    d2h_bytes: int = 0


class PipelineBackend:
    """Runs ``pipeline.pre`` -> ``inner`` -> ``pipeline.post`` as one batch call on ``inner``'s device.

    On a GPU replica (``inner.device`` is ``"cuda:N"`` and CuPy is installed) the steps run as
    CUDA kernels on one stream (``inner.stream`` when it has one, so the model computes on it
    too): NumPy inputs are uploaded once through pinned host memory, and only what post-processing
    returns is downloaded, into pinned memory; CuPy inputs stay on the device and CuPy outputs
    come back. On the CPU the steps run as their NumPy twins. :attr:`signature` is what callers
    send and get back (see :meth:`Pipeline.signature`).

    A batch that runs out of device memory is retried as two halves (and so on), down to single
    rows; a row that still does not fit is :class:`DeviceOutOfMemory`. A device that fails
    whatever the input raises :class:`DeviceLost`, a :class:`~inferkit.ReplicaFault`.
    """

    def __init__(self, inner: Backend, pipeline: Pipeline | None = None) -> None:
        self.inner = inner
        self.pipeline = pipeline if pipeline is not None else Pipeline()
        self.transfers = Transfers()
        """Counts of the copies between host and device (none on the CPU)."""
        self._device = inner.device
        self.cpu_threads = cpu_threads(inner)
        """The model's, as the inner backend reports them (see :func:`~inferkit.backends.base.cpu_threads`)."""
        self._signature = self.pipeline.signature(inner.signature)
        model = inner.signature
        self._model_inputs = tuple(s.name for s in model.inputs) if model is not None else ()
        self._kit = CPU
        self._cp: Any = None
        self.stream: Any = None
        """The CuPy stream this replica's batches run on (GPU only)."""
        self._gpu = device_id(self._device)
        if self._gpu is None:
            return
        try:
            import cupy  # noqa: PLC0415  (optional: the gpu extra)
        except ImportError:
            msg = (
                f"the model runs on {self._device} but CuPy is not installed (the gpu extra): pre- and "
                "post-processing run on the CPU and every batch goes through host memory"
            )
            warnings.warn(DeviceFallbackWarning(msg), stacklevel=2)
            return
        from inferkit.gpu import cuda  # noqa: PLC0415  (imports CuPy)

        self._cp = cupy
        self._kit = Kit(cuda, cupy)
        stream = getattr(inner, "stream", None)
        if stream is None:
            with cupy.cuda.Device(self._gpu):
                stream = cupy.cuda.Stream(non_blocking=True)
        self.stream = stream

    @property
    def signature(self) -> Signature | None:
        """What callers send and get back: the model's signature through the pipeline."""
        return self._signature

    @property
    def device(self) -> str:
        """The inner backend's device."""
        return self._device

    def run(self, inputs: Mapping[str, Any]) -> Mapping[str, Any]:
        """Pre-process, run the model and post-process one batch, halving it on out-of-memory."""
        rows = int(next(iter(inputs.values())).shape[0])
        return self._run(inputs, rows)

    def _run(self, inputs: Mapping[str, Any], rows: int) -> Mapping[str, Any]:
        try:
            return self._once(inputs)
        except Exception as exc:
            kind = classify(exc)
            if kind == "lost":
                msg = f"{self._device} failed: {type(exc).__name__}: {exc}"
                raise DeviceLost(msg) from exc
            if kind != "oom":
                raise
            if rows == 1:
                msg = f"{self._device} ran out of memory for one row on its own: {type(exc).__name__}: {exc}"
                raise DeviceOutOfMemory(msg) from exc
        self._free()
        mid = rows // 2
        first = self._run({n: a[:mid] for n, a in inputs.items()}, mid)
        second = self._run({n: a[mid:] for n, a in inputs.items()}, rows - mid)
        return {n: array_module(a).concatenate([a, second[n]]) for n, a in first.items()}

    def _free(self) -> None:
        if self._cp is not None:  # cached blocks of the failed attempt go back before the halves run
            self._cp.get_default_memory_pool().free_all_blocks()

    def _once(self, inputs: Mapping[str, Any]) -> Mapping[str, Any]:
        if self._cp is None:
            arrays = self.pipeline.preprocess(dict(inputs), CPU, self._model_inputs)
            return self.pipeline.postprocess(dict(self.inner.run(arrays)), CPU)
        cp = self._cp
        on_device = not any(isinstance(a, np.ndarray) for a in inputs.values())
        staged: list[Any] = []  # pinned buffers must outlive their asynchronous copies
        try:
            with cp.cuda.Device(self._gpu), self.stream:
                arrays = {n: self._upload(a, staged) for n, a in inputs.items()}
                arrays = self.pipeline.preprocess(arrays, self._kit, self._model_inputs)
                outputs = self.pipeline.postprocess(dict(self.inner.run(arrays)), self._kit)
                if not on_device:
                    outputs = {n: self._download(a, staged) for n, a in outputs.items()}
                self.stream.synchronize()
        except BaseException:
            # A step failed with copies still queued: their pinned buffers go back to CuPy's pool when `staged`
            # goes, and the next batch reused them under a copy in flight. Wait for the stream first; a sync that
            # fails too (a lost device) has nothing left running, and the batch's own error is the one to raise.
            with contextlib.suppress(Exception):
                self.stream.synchronize()
            raise
        return outputs

    def _upload(self, value: Any, staged: list[Any]) -> Any:
        cp = self._cp
        if not isinstance(value, np.ndarray):
            return cp.asarray(value)
        src = np.ascontiguousarray(value)
        memory = cp.cuda.alloc_pinned_memory(max(src.nbytes, 1))
        host = np.frombuffer(memory, src.dtype, src.size).reshape(src.shape)
        host[...] = src
        staged.append(memory)
        out = cp.empty(src.shape, src.dtype)
        out.set(host, stream=self.stream)
        self.transfers.h2d += 1
        self.transfers.h2d_bytes += src.nbytes
        return out

    def _download(self, value: Any, staged: list[Any]) -> Any:
        cp = self._cp
        if isinstance(value, np.ndarray):
            return value
        src = cp.ascontiguousarray(value)
        memory = cp.cuda.alloc_pinned_memory(max(src.nbytes, 1))
        # The result owns its pinned buffer (np.frombuffer keeps it), so it is never reused under the caller.
        host = np.frombuffer(memory, src.dtype, src.size).reshape(src.shape)
        src.get(stream=self.stream, out=host, blocking=False)  # into pinned memory: asynchronous until the sync
        staged.append(src)
        self.transfers.d2h += 1
        self.transfers.d2h_bytes += src.nbytes
        return host

    def close(self) -> None:
        """Close the inner backend."""
        self.inner.close()
