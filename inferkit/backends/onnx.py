"""ONNX Runtime as a backend (the ``cpu`` or ``gpu`` extra)."""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from inferkit.arrays import array_module
from inferkit.backends.base import usable_cores
from inferkit.backends.device import DeviceFallbackWarning, DeviceUnavailable, classify, device_id
from inferkit.backends.model_size import model_bytes
from inferkit.backends.widths import Widths, wide_options
from inferkit.errors import InvalidInput
from inferkit.signature import Signature

__all__ = ["OnnxBackend", "default_intra_op_threads"]

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


WARMUP_STOP_S = 1.0
"""A warm-up call this long ends the warm-up: a big model's largest batches warm up on first use."""

WARMUP_MEMORY_SHARE = 4
"""The warm-up skips batch sizes whose zero inputs alone would take over 1/this of physical memory."""


def physical_memory() -> int:
    """Bytes of physical memory on this machine (2^63 - 1 where the system cannot say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not POSIX
        return 2**63 - 1


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
    a call (past the first) that took :data:`WARMUP_STOP_S` or more, where a first call's extra
    cost is a small part of the call; on a device it stops at the first size the device cannot
    hold (serving splits such batches). Sizes whose inputs would take more than physical memory
    / :data:`WARMUP_MEMORY_SHARE` are never tried: a host that overcommits memory grants the
    zeros, and kills the process once the model writes its outputs. :attr:`warmed` lists the
    sizes it ran.

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
        self.stream: Any = None
        """The CuPy stream ONNX Runtime computes on (GPU with CuPy installed), else ``None``."""
        self._gpu = None if device is None else device_id(device)
        self._run_options: Any = None
        if providers is None:
            providers = (
                [_CPU] if device is not None and self._gpu is None  # "cpu" even where ORT offers CUDA
                else self._providers(ort, provider_options or {}, tensorrt=tensorrt, strict=strict)
            )  # fmt: skip
        source = model if isinstance(model, bytes) else str(Path(model))
        self.session = ort.InferenceSession(source, sess_options=options, providers=list(providers))
        self._signature = Signature.from_onnx(self.session)
        self._outputs = [o.name for o in self._signature.outputs]
        self._inputs = {s.name for s in self._signature.inputs}
        self._ep_fail: type[Exception] = ort.capi.onnxruntime_pybind11_state.EPFail
        self._row_shapes: dict[str, tuple[int, ...]] | None = None  # see _learn_row_shapes
        self._strings = [s.name for s in self._signature.inputs if s.dtype.kind == "O"]
        first = self.session.get_providers()[0]
        self._device = _DEVICES.get(first, "cpu")
        if self._device == "cuda":
            self._device += f":{self.session.get_provider_options()[first].get('device_id', 0)}"
        wanted = providers[0] if isinstance(providers[0], str) else providers[0][0]
        if self._gpu is not None and wanted not in {_CPU, first}:
            where = "the CPU" if self._device == "cpu" else first
            why = f"ONNX Runtime could not load {wanted} (the session runs on {self.session.get_providers()})"
            self._fallback(why, where, strict=strict)
        if self._device == "cpu":
            self.stream = None
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
        warmed: list[int] = []
        fixed = self._fixed = fixed_rows(self.session)
        if fixed is not None and warmup:  # the only batch the model takes
            warmup = (fixed,)
        most_rows = physical_memory() // WARMUP_MEMORY_SHARE // max(self._row_bytes(), 1)
        for rows in warmup:
            if rows > most_rows:
                break  # zeros this big could only be held on an overcommitting host, until it kills us
            start = time.perf_counter()
            try:
                if not self._warmup(rows):
                    break
            except Exception as exc:
                if classify(exc) != "oom":
                    raise
                break  # the device holds fewer rows at once: serving splits such batches in halves
            warmed.append(rows)
            # On the CPU only: a GPU's first calls of a size build engines and search algorithms.
            slow = time.perf_counter() - start >= WARMUP_STOP_S
            if slow and self._device == "cpu" and len(warmed) > 1:
                break
        self.warmed = tuple(warmed)
        """The batch sizes the warm-up ran, in order."""

    def _providers(
        self, ort: Any, options: Mapping[str, Mapping[str, Any]], *, tensorrt: bool, strict: bool
    ) -> list[Any]:
        available = ort.get_available_providers()
        if self._gpu is None:
            return [_CUDA, _CPU] if _CUDA in available else [_CPU]
        if _CUDA not in available:  # asking for it anyway would only add ORT's own warning
            self._fallback(f"the installed onnxruntime offers {available}, not {_CUDA}", "the CPU", strict=strict)
            return [_CPU]
        stream = self._make_stream()
        chosen: list[Any] = []
        names = [_TRT, _CUDA] if tensorrt else [_CUDA]
        for name in names:
            if name not in available:
                self._fallback(f"the installed onnxruntime offers {available}, not {name}", _CUDA, strict=strict)
                continue
            opts = {"device_id": self._gpu, **options.get(name, {})}
            if stream is not None and "user_compute_stream" not in opts:
                opts |= {"has_user_compute_stream": "1", "user_compute_stream": str(stream.ptr)}
            chosen.append((name, {k: str(v) for k, v in opts.items()}))
        if stream is not None and all(dict(o).get("user_compute_stream") == str(stream.ptr) for _, o in chosen):
            self.stream = stream
            # ORT computes on our stream, so the caller's next kernels are ordered after it: no sync.
            self._run_options = ort.RunOptions()
            self._run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        return [*chosen, _CPU]

    def _make_stream(self) -> Any:
        try:
            import cupy  # noqa: PLC0415  (optional: without it, no I/O binding to device memory)
        except ImportError:
            return None
        with cupy.cuda.Device(self._gpu):
            return cupy.cuda.Stream(non_blocking=True)

    def _fallback(self, why: str, where: str, *, strict: bool) -> None:
        msg = f"device cuda:{self._gpu} was asked for, but {why}"
        if strict:
            raise DeviceUnavailable(f"{msg} (strict=True)")
        warnings.warn(DeviceFallbackWarning(f"{msg}; the model runs on {where}"), stacklevel=4)

    def _row_bytes(self) -> int:
        """Bytes of one row of every fixed-width input (what a warm-up row allocates before the model runs)."""
        total = 0
        for spec in self._signature.inputs:
            dims = [d for d in spec.shape[1:] if d is not None]
            total += int(np.prod(dims, dtype=np.int64)) * spec.dtype.itemsize
        return total

    def _warmup(self, rows: int) -> bool:
        """Run zeros of ``rows`` rows; False when the inputs' shapes or dtypes leave nothing to run."""
        feeds = {}
        for spec in self._signature.inputs:
            if any(d is None for d in spec.shape[1:]) or spec.dtype == np.dtype(object):
                return False
            dims = tuple(d for d in spec.shape[1:] if d is not None)
            feeds[spec.name] = np.zeros((rows, *dims), dtype=spec.dtype)
        for name, out in zip(self._outputs, self.session.run(self._outputs, feeds), strict=True):
            if out.ndim == 0 or out.shape[0] != rows:  # every request would fail: say so at load
                msg = (
                    f"model output {name!r} has shape {out.shape} for a batch of {rows} rows: its first axis is "
                    "not a batch axis; inferkit returns one output row per input row"
                )
                raise ValueError(msg)
        sessions = self._sessions
        if sessions.wide is not None and (rows >= sessions.wide_rows or rows == 1):
            sessions.wide.run(self._outputs, feeds)
            if rows == 1 and sessions.lone is not sessions.wide:
                sessions.lone.run(self._outputs, feeds)
        return True

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
        import cupy as cp  # noqa: PLC0415  (CuPy arrays came in, so it is installed)

        if self._gpu is None or self._device == "cpu":  # the session is on the CPU: copy, and say where
            host = {n: cp.asnumpy(a) if hasattr(a, "__cuda_array_interface__") else a for n, a in inputs.items()}
            return {n: cp.asarray(a) for n, a in self.run(host).items()}
        gpu = int(self._device.split(":")[1])
        with cp.cuda.Device(gpu):
            binding = self.session.io_binding()
            held = []  # the bound arrays must outlive the run
            for name, value in inputs.items():
                arr = cp.ascontiguousarray(value)
                held.append(arr)
                binding.bind_input(name, "cuda", gpu, arr.dtype.type, list(arr.shape), arr.data.ptr)
            rows = held[0].shape[0]
            known = self._row_shapes
            outputs: dict[str, Any] = {}
            for spec in self._signature.outputs:
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
                self.session.run_with_iobinding(binding)  # ORT synchronises its stream at the end
            else:
                self.session.run_with_iobinding(binding, self._run_options)
            if len(outputs) < len(self._outputs):
                for name, value in zip(self._outputs, binding.get_outputs(), strict=True):
                    outputs.setdefault(name, _cupy_view(cp, value, gpu))
                if known is None:
                    self._row_shapes = self._learn_row_shapes(outputs, rows)
            return {name: outputs[name] for name in self._outputs}

    def _learn_row_shapes(self, outputs: Mapping[str, Any], rows: int) -> dict[str, tuple[int, ...]]:
        """The outputs later device runs bind to memory allocated here, and their shapes past the batch axis.

        Those whose model shape past the batch axis is fixed and that this first run gave with one
        row per input row: no ``OrtValue`` to wrap after each run, and ORT's output lookup skipped.
        """
        learned = {}
        for spec in self._signature.outputs:
            out = outputs[spec.name]
            fixed = all(d is not None for d in spec.shape[1:])
            if fixed and out.dtype == spec.dtype and out.shape == (rows, *spec.shape[1:]):
                learned[spec.name] = tuple(out.shape[1:])
        return learned

    def close(self) -> None:
        """Drop the session(s)."""
        self.session = self._sessions = None


_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(uint16)": np.uint16, "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64, "tensor(bool)": np.bool_,
}  # fmt: skip


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


def _cupy_view(cp: Any, value: Any, gpu: int) -> Any:
    """A CuPy array over an ``OrtValue``'s device memory, no copy; the array keeps the value alive."""
    dtype = np.dtype(_ORT_TYPES[value.data_type()])
    shape = tuple(value.shape())
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    memory = cp.cuda.UnownedMemory(value.data_ptr(), nbytes, value, gpu)
    return cp.ndarray(shape, dtype, cp.cuda.MemoryPointer(memory, 0))


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
