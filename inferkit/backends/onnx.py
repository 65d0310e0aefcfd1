"""ONNX Runtime as a backend (the ``cpu`` or ``gpu`` extra)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from inferkit.errors import InvalidInput
from inferkit.signature import Signature

__all__ = ["OnnxBackend", "default_intra_op_threads"]

Array = np.ndarray[Any, Any]
_DEVICES = {"CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "cuda"}


def default_intra_op_threads(replicas: int) -> int:
    """Intra-op threads per session so that ``replicas`` sessions do not oversubscribe the cores.

    One core is left to the callers and the batcher when there is more than one: on a busy
    machine their wake-ups compete with the model for the same cores.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, (cores - 1) // replicas) if cores > 1 else 1


class OnnxBackend:
    """One ``onnxruntime.InferenceSession``.

    ``model`` is a path or the model's bytes. ``providers`` defaults to CUDA then CPU when the
    installed onnxruntime offers CUDA, else CPU; the device is read back from
    ``session.get_providers()`` once the session is built, so a provider that failed to load is
    never reported as used. ``warmup`` runs zeros at each batch size once so that the first real
    request is not the slow one (skipped when a non-batch dimension is dynamic).
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | bytes,
        *,
        providers: Sequence[Any] | None = None,
        session_options: Any = None,
        intra_op_threads: int | None = None,
        warmup: Sequence[int] = (),
    ) -> None:
        import onnxruntime as ort  # noqa: PLC0415  (optional extra)

        options = session_options if session_options is not None else ort.SessionOptions()
        if intra_op_threads is not None:
            options.intra_op_num_threads = intra_op_threads
        if session_options is None:
            options.inter_op_num_threads = 1
        if providers is None:
            available = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider",) if p in available]
            providers.append("CPUExecutionProvider")
        source = model if isinstance(model, bytes) else str(Path(model))
        self.session = ort.InferenceSession(source, sess_options=options, providers=list(providers))
        self._signature = Signature.from_onnx(self.session)
        self._outputs = [o.name for o in self._signature.outputs]
        self._strings = [s.name for s in self._signature.inputs if s.dtype.kind == "O"]
        first = self.session.get_providers()[0]
        self._device = _DEVICES.get(first, "cpu")
        if self._device == "cuda":
            self._device += f":{self.session.get_provider_options()[first].get('device_id', 0)}"
        for rows in warmup:
            self._warmup(rows)

    def _warmup(self, rows: int) -> None:
        feeds = {}
        for spec in self._signature.inputs:
            if any(d is None for d in spec.shape[1:]) or spec.dtype == np.dtype(object):
                return
            dims = tuple(d for d in spec.shape[1:] if d is not None)
            feeds[spec.name] = np.zeros((rows, *dims), dtype=spec.dtype)
        self.session.run(self._outputs, feeds)

    @property
    def signature(self) -> Signature:
        """Input and output specs read from the model."""
        return self._signature

    @property
    def device(self) -> str:
        """``"cuda:N"`` when the session's first provider is CUDA or TensorRT, else ``"cpu"``."""
        return self._device

    def run(self, inputs: Mapping[str, Array]) -> Mapping[str, Array]:
        """Run the session on one batch."""
        feeds = dict(inputs)
        for name in self._strings:
            feeds[name] = _text(name, feeds[name])
        return dict(zip(self._outputs, self.session.run(self._outputs, feeds), strict=True))

    def close(self) -> None:
        """Drop the session."""
        self.session = None


def _text(name: str, array: Array) -> Array:
    """A string input as ONNX Runtime reads it: ``str`` elements (it would store ``repr`` of ``bytes``).

    ``InvalidInput`` for bytes that are not UTF-8, which its string tensors cannot hold.
    """
    out = np.empty(array.shape, dtype=object)
    flat, target = array.reshape(-1), out.reshape(-1)
    for i, item in enumerate(flat):
        if isinstance(item, bytes | np.bytes_):
            try:
                target[i] = item.decode()
            except UnicodeDecodeError:
                msg = f"input {name!r}: {item[:32]!r} is not UTF-8; ONNX Runtime string tensors hold UTF-8 text only"
                raise InvalidInput(msg, input_name=name) from None
        else:
            target[i] = str(item)
    return out
