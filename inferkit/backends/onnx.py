"""ONNX Runtime as a backend (the ``cpu`` or ``gpu`` extra)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from inferkit.arrays import array_module
from inferkit.backends.base import usable_cores
from inferkit.backends.device import DeviceFallbackWarning, DeviceUnavailable, device_id
from inferkit.backends.model_size import model_bytes
from inferkit.backends.onnx_binding import DeviceBinding, new_stream
from inferkit.backends.onnx_warmup import WARMUP_MEMORY_SHARE, WARMUP_STOP_S, physical_memory, warm_up
from inferkit.backends.widths import Widths, wide_options
from inferkit.errors import InvalidInput
from inferkit.signature import Signature

# The warm-up's names, importable from here as before they moved to onnx_warmup.
__all__ = ["WARMUP_MEMORY_SHARE", "WARMUP_STOP_S", "OnnxBackend", "default_intra_op_threads", "physical_memory"]

Array = np.ndarray[Any, Any]
_DEVICES = {"CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "cuda"}
_CUDA, _TRT, _CPU = "CUDAExecutionProvider", "TensorrtExecutionProvider", "CPUExecutionProvider"


def default_intra_op_threads(replicas: int) -> int:
    """Intra-op threads per session so that ``replicas`` sessions do not oversubscribe the cores.

    One core is left to the callers and the batcher when there is more than one: on a busy
    machine their wake-ups compete with the model for the same cores.
    """
    cores = usable_cores()
    return max(1, (cores - 1) // replicas) if cores > 1 else 1


def default_wide_threads(replicas: int) -> int:
    """Intra-op threads per session for full batches: every core, shared by ``replicas``.

    A full batch means callers queue faster than the model serves them, so they are waiting,
    not computing: the core kept for them in :func:`default_intra_op_threads` would sit idle.
    """
    return max(1, usable_cores() // replicas)


MAX_INTRA_OP_THREADS = 1024
"""The most ``intra_op_threads`` a session takes, unless the machine has more usable cores."""


WIDE_MAX_BYTES = 512 * 2**20
"""Models bigger than this get no second, wide session (it holds its own copy of the weights)."""

SPIN_MAX_BYTES = 64 * 2**20
"""Models bigger than this get no third, spinning session for a lone caller: their calls are long
enough that waking the wide session's threads is lost in them."""


class OnnxBackend:
    """One ``onnxruntime.InferenceSession``.

    ``model`` is a path or the model's bytes. ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:N"``)
    picks the providers: on a GPU, TensorRT (with ``tensorrt=True``) then CUDA with
    ``device_id=N`` and ``provider_options`` (``{"TensorrtExecutionProvider": {...},
    "CUDAExecutionProvider": {...}}``), then the CPU for the nodes they do not cover. With neither
    ``device`` nor ``providers`` it is CUDA then CPU when the installed onnxruntime offers CUDA,
    else CPU; ``providers`` goes to ONNX Runtime as it is. The device is read back from
    ``session.get_providers()`` once the session is built, so a provider that failed to load is
    never reported as used. When a GPU was asked for and the session is on the CPU, that is a
    :class:`DeviceFallbackWarning`, or with ``strict=True`` a :class:`DeviceUnavailable` error.

    On a GPU, when CuPy is installed, the session computes on a CUDA stream of its own,
    :attr:`stream`, handed to ONNX Runtime as its ``user_compute_stream``; :meth:`run` given CuPy
    arrays binds them and the outputs through I/O binding (no host copy) and returns CuPy arrays.
    ``warmup`` runs zeros at each batch size once, smallest first, so that the first real request
    is not the slow one (skipped when a non-batch dimension is dynamic; only that size when the
    model fixes its batch axis, as an export with a batch of 1 does). On the CPU it stops after
    a call (past the first) that took :data:`~.onnx_warmup.WARMUP_STOP_S` or more, where a first
    call's extra cost is a small part of the call; on a device it stops at the first size the
    device cannot hold (serving splits such batches). Sizes whose inputs would take more than
    the memory the process may use (the machine's, or its container's cgroup limit) /
    :data:`~.onnx_warmup.WARMUP_MEMORY_SHARE` are never tried: a host that
    overcommits memory grants the zeros, and kills the process once the model writes its
    outputs. :attr:`warmed` lists the sizes it ran.

    ``intra_op_threads`` is at most :data:`MAX_INTRA_OP_THREADS`, or the usable cores where there
    are more.

    On the CPU, ``wide_threads`` (more than ``intra_op_threads``) opens a second session with
    that many intra-op threads for batches of ``wide_rows`` rows or more that follow another
    such batch, and for batches while they average under 1.5 rows: small batches of many
    callers mean the callers are the bound and need a core of their own; a run of full ones
    that the model is, and lone callers that they wait on it; either way every core is the
    model's. Its threads never spin (``session.intra_op.allow_spinning=0``): a spinning thread
    would take the core that the callers, or a server's event loop, need between runs and
    between the parallel parts of one run. A lone caller blocked on its own thread runs on a
    third session, which keeps spinning, when the model is at most :data:`SPIN_MAX_BYTES` and no
    replica's worker has run a batch for :data:`~inferkit.backends.widths.ALONE_AFTER_WORKER_S`: the next call finds its
    threads awake (waking them costs a small model's call ~20 us). Each
    session holds its own copy of the weights, so models over :data:`WIDE_MAX_BYTES` (external
    data files included) do without both.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | bytes,
        *,
        device: str | None = None,
        providers: Sequence[Any] | None = None,
        provider_options: Mapping[str, Mapping[str, Any]] | None = None,
        tensorrt: bool = False,
        strict: bool = False,
        session_options: Any = None,
        intra_op_threads: int | None = None,
        warmup: Sequence[int] = (),
        wide_threads: int | None = None,
        wide_rows: int = 0,
    ) -> None:
        import onnxruntime as ort  # noqa: PLC0415  (optional extra)

        if device is not None and providers is not None:
            msg = "give device= (with provider_options=) or providers=, not both"
            raise TypeError(msg)
        most = max(MAX_INTRA_OP_THREADS, usable_cores())  # past a C int: a three-line pybind11 dump
        if intra_op_threads is not None and (
            not isinstance(intra_op_threads, int)
            or isinstance(intra_op_threads, bool)
            or not 0 <= intra_op_threads <= most
        ):
            msg = (
                f"intra_op_threads must be an int >= 0 (0: ONNX Runtime's default) and at most {most}, "
                f"got {intra_op_threads!r:.100}"
            )
            raise ValueError(msg)
        options = session_options if session_options is not None else ort.SessionOptions()
        if intra_op_threads is not None:
            options.intra_op_num_threads = intra_op_threads
        if session_options is None:
            options.inter_op_num_threads = 1
        gpu = None if device is None else device_id(device)
        stream = None  # the CuPy stream the session computes on, when it is given one
        if providers is None and device is not None and gpu is None:
            providers = [_CPU]  # "cpu" even where ORT offers CUDA
        elif providers is None:
            providers, stream = _providers(ort, gpu, provider_options or {}, tensorrt=tensorrt, strict=strict)
        source = model if isinstance(model, bytes) else str(Path(model))
        self.session = ort.InferenceSession(source, sess_options=options, providers=list(providers))
        self._signature = Signature.from_onnx(self.session)
        self._outputs = [o.name for o in self._signature.outputs]
        self._inputs = {s.name for s in self._signature.inputs}
        self._ep_fail: type[Exception] = ort.capi.onnxruntime_pybind11_state.EPFail
        self._strings = [s.name for s in self._signature.inputs if s.dtype.kind == "O"]
        first = self.session.get_providers()[0]
        self._device = _DEVICES.get(first, "cpu")
        if self._device == "cuda":
            self._device += f":{self.session.get_provider_options()[first].get('device_id', 0)}"
        wanted = providers[0] if isinstance(providers[0], str) else providers[0][0]
        if gpu is not None and wanted not in {_CPU, first}:
            where = "the CPU" if self._device == "cpu" else first
            why = f"ONNX Runtime could not load {wanted} (the session runs on {self.session.get_providers()})"
            _fallback(gpu, why, where, strict=strict)
        on_gpu = gpu is not None and self._device != "cpu"  # else CuPy inputs are copied to the host
        self._binding = DeviceBinding(self._signature, int(self._device.split(":")[1]), stream) if on_gpu else None
        self.cpu_threads = 0 if self._device != "cpu" else options.intra_op_num_threads or usable_cores()
        """Cores a run keeps busy: its intra-op threads (0 on a GPU); see :func:`.base.cpu_threads`."""
        wide = lone = None
        narrow = intra_op_threads or 0
        if session_options is None and wide_threads is not None and wide_threads > narrow > 0 and self._device == "cpu":
            size = model_bytes(model)
            if size <= WIDE_MAX_BYTES:
                # Options of their own: ONNX Runtime keeps a session's options object and rebuilds
                # the session from it on ``set_providers`` (its provider fallback does that too).
                if size <= SPIN_MAX_BYTES:
                    spinning = wide_options(ort, wide_threads)
                    lone = ort.InferenceSession(source, sess_options=spinning, providers=list(providers))
                still = wide_options(ort, wide_threads)
                still.add_session_config_entry("session.intra_op.allow_spinning", "0")
                wide = ort.InferenceSession(source, sess_options=still, providers=list(providers))
        self._sessions: Any = Widths(self.session, wide, wide_rows, lone)
        fixed = self._fixed = fixed_rows(self.session)
        if fixed is not None and warmup:  # the only batch the model takes
            warmup = (fixed,)
        self.warmed = warm_up(self._sessions, self._signature, warmup, on_cpu=self._device == "cpu")
        """The batch sizes the warm-up ran, in order."""

    @property
    def stream(self) -> Any:
        """The CuPy stream ONNX Runtime computes on (GPU with CuPy installed), else ``None``."""
        return None if self._binding is None else self._binding.stream

    @property
    def signature(self) -> Signature:
        """Input and output specs read from the model."""
        return self._signature

    @property
    def device(self) -> str:
        """``"cuda:N"`` when the session's first provider is CUDA or TensorRT, else ``"cpu"``."""
        return self._device

    def run(self, inputs: Mapping[str, Array]) -> Mapping[str, Array]:
        """Run the session on one batch: NumPy in, NumPy out; CuPy in, CuPy out (I/O binding on a GPU).

        Inputs named exactly as the model's go to ONNX Runtime's compiled session, past its
        Python wrapper's per-call checks; other names go through the wrapper, which says what is
        wrong. A provider failure (``EPFail``) is run again through the wrapper while its
        one fallback to other providers is still unused, as it always was.
        """
        fixed = self._fixed
        if fixed is not None and next(iter(inputs.values())).shape[0] != fixed:
            return self._in_chunks(inputs, fixed)
        for a in inputs.values():  # a loop, not any(generator): this runs for every batch
            if type(a) is not np.ndarray and hasattr(a, "__cuda_array_interface__"):
                return self._run_device(inputs)
        if inputs.keys() != self._inputs:
            return dict(zip(self._outputs, self.session.run(self._outputs, dict(inputs)), strict=True))
        feeds = inputs
        if self._strings:
            feeds = dict(inputs)
            for name in self._strings:
                feeds[name] = _text(name, feeds[name])
        session = self._sessions.session_for(next(iter(inputs.values())).shape[0])
        try:
            outputs = getattr(session, "_sess", session).run(self._outputs, feeds, None)
        except self._ep_fail:
            if not getattr(session, "_enable_fallback", False):  # the wrapper would only fail again
                raise
            outputs = session.run(self._outputs, feeds)  # it retries once on its fallback providers
        return dict(zip(self._outputs, outputs, strict=True))

    def _in_chunks(self, inputs: Mapping[str, Any], size: int) -> Mapping[str, Any]:
        """A batch for a model whose batch axis is fixed at ``size``: run in chunks of that size.

        The last chunk is padded with copies of its last row, whose outputs are dropped (a
        batch's rows are independent, as batching assumes), so any batch size serves.
        """
        rows = next(iter(inputs.values())).shape[0]
        parts = []
        for start in range(0, rows, size):
            chunk = {n: a[start : start + size] for n, a in inputs.items()}
            short = size - next(iter(chunk.values())).shape[0]
            if short:
                chunk = {n: _padded(a, short) for n, a in chunk.items()}
            out = self.run(chunk)
            parts.append({n: o[: size - short] for n, o in out.items()})
        return {n: array_module(parts[0][n]).concatenate([p[n] for p in parts]) for n in parts[0]}

    def session_for(self, rows: int) -> Any:
        """The session a batch of ``rows`` rows runs on: the narrow one or a wide one (:class:`.widths.Widths`)."""
        return self._sessions.session_for(rows)

    def _run_device(self, inputs: Mapping[str, Any]) -> Mapping[str, Any]:
        if self._binding is not None:
            return self._binding.run(self.session, inputs)
        import cupy as cp  # noqa: PLC0415  (CuPy arrays came in, so it is installed)

        # The session is on the CPU: copy, and say where.
        host = {n: cp.asnumpy(a) if hasattr(a, "__cuda_array_interface__") else a for n, a in inputs.items()}
        return {n: cp.asarray(a) for n, a in self.run(host).items()}

    def close(self) -> None:
        """Drop the session(s)."""
        self.session = self._sessions = None


def _providers(
    ort: Any, gpu: int | None, options: Mapping[str, Mapping[str, Any]], *, tensorrt: bool, strict: bool
) -> tuple[list[Any], Any]:
    """The providers for ``gpu`` (``None``: CUDA when offered), and the CuPy stream they compute on, if any."""
    available = ort.get_available_providers()
    if gpu is None:
        return ([_CUDA, _CPU] if _CUDA in available else [_CPU]), None
    if _CUDA not in available:  # asking for it anyway would only add ORT's own warning
        _fallback(gpu, f"the installed onnxruntime offers {available}, not {_CUDA}", "the CPU", strict=strict)
        return [_CPU], None
    stream = new_stream(gpu)
    chosen: list[Any] = []
    names = [_TRT, _CUDA] if tensorrt else [_CUDA]
    for name in names:
        if name not in available:
            _fallback(gpu, f"the installed onnxruntime offers {available}, not {name}", _CUDA, strict=strict)
            continue
        opts = {"device_id": gpu, **options.get(name, {})}
        if stream is not None and "user_compute_stream" not in opts:
            opts |= {"has_user_compute_stream": "1", "user_compute_stream": str(stream.ptr)}
        chosen.append((name, {k: str(v) for k, v in opts.items()}))
    ours = stream is not None and all(dict(o).get("user_compute_stream") == str(stream.ptr) for _, o in chosen)
    return [*chosen, _CPU], stream if ours else None


def _fallback(gpu: int, why: str, where: str, *, strict: bool) -> None:
    msg = f"device cuda:{gpu} was asked for, but {why}"
    if strict:
        raise DeviceUnavailable(f"{msg} (strict=True)")
    warnings.warn(DeviceFallbackWarning(f"{msg}; the model runs on {where}"), stacklevel=4)


def _padded(a: Any, short: int) -> Any:
    """``a`` with its last row repeated ``short`` more times."""
    xp = array_module(a)
    return xp.concatenate([a, xp.repeat(a[-1:], short, axis=0)])


def fixed_rows(session: Any) -> int | None:
    """The batch size the model's inputs fix their first axis at, if they do; ``ValueError`` if two disagree."""
    fixed = {a.name: a.shape[0] for a in session.get_inputs() if a.shape and type(a.shape[0]) is int and a.shape[0] > 0}
    sizes = set(fixed.values())
    if len(sizes) > 1:
        msg = f"model inputs fix their batch axis at different sizes ({fixed}): no batch can feed them all"
        raise ValueError(msg)
    return sizes.pop() if sizes else None


def _text(name: str, array: Array) -> Array:
    """A string input as ONNX Runtime reads it: ``str`` elements (it would store ``repr`` of ``bytes``).

    ``InvalidInput`` for bytes that are not UTF-8, or text that has none, which its string
    tensors cannot hold.
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
            text = str(item)
            if not text.isascii():  # O(1) for ASCII; a lone surrogate has no UTF-8, ORT would fail the batch
                try:
                    text.encode()
                except UnicodeEncodeError:
                    msg = f"input {name!r}: {text[:32]!r} is not valid Unicode text (a lone surrogate)"
                    raise InvalidInput(msg, input_name=name) from None
            target[i] = text
    return out
