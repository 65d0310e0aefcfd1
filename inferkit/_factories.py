"""The plumbing of :class:`~inferkit.Predictor`'s ``from_*`` constructors.

Their keyword arguments become a :class:`BatchConfig` and a :class:`PoolConfig`, and the
backend each replica loads becomes a factory: placed on its device, wrapped in its pipeline,
warmed up. Optional packages (onnxruntime, torch, ``inferkit.gpu``) are imported here on use only.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from inferkit.backends.base import Backend, BackendFactory
from inferkit.backends.callable import CallableBackend
from inferkit.batching import BatchConfig
from inferkit.pool import Balancer, PoolConfig
from inferkit.signature import Signature, TensorSpec

if TYPE_CHECKING:
    import os

    from inferkit.gpu.pipeline import Pipeline

__all__ = [
    "BATCHING",
    "POOL",
    "batching_config",
    "callable_factory",
    "onnx_factory",
    "pipeline_of",
    "pool_config",
    "torch_factory",
]

BATCHING = BatchConfig()  # every batching and pool default is the config class's, written once
POOL = PoolConfig()


def onnx_factory(
    model: str | os.PathLike[str] | bytes,
    *,
    replicas: int,
    batching: BatchConfig,
    warmup: bool,
    device: str | Sequence[str] | None,
    pipeline: Pipeline | None,
    preprocess: Callable[[Any], Any] | None,
    postprocess: Callable[[Any], Any] | None,
    intra_op_threads: int | None,
    session_options: Any,
    **options: Any,
) -> BackendFactory:
    """One ONNX Runtime replica per call, on the next device, warmed up to ``batching.call_rows`` rows if ``warmup``.

    ``options`` (providers, provider_options, tensorrt, strict) go to ``OnnxBackend`` as they are.
    """
    from inferkit.backends import onnx  # noqa: PLC0415

    threads, wide = intra_op_threads, None
    if threads is None and session_options is None:
        threads, wide = onnx.default_intra_op_threads(replicas), onnx.default_wide_threads(replicas)
    sizes = _warmup_sizes(batching.call_rows) if warmup else ()
    devices = _devices(device)
    pipe = pipeline_of(pipeline, preprocess, postprocess)
    turn = itertools.count()

    def factory() -> Backend:
        backend = onnx.OnnxBackend(
            model,
            device=None if devices is None else devices[next(turn) % len(devices)],
            session_options=session_options,
            intra_op_threads=threads,
            warmup=sizes,
            wide_threads=wide,
            wide_rows=max(2, batching.full_rows // 2),
            **options,
        )
        return _wrap(backend, pipe)

    return factory


def torch_factory(
    module: Any,
    factory: Callable[[], Any] | None,
    device: str | Sequence[str],
    pipeline: Pipeline | None,
    preprocess: Callable[[Any], Any] | None,
    postprocess: Callable[[Any], Any] | None,
    **options: Any,
) -> BackendFactory:
    """A ``TorchBackend`` per call: a deep copy of ``module`` (or ``factory()``) on the next device.

    ``options`` (inputs, outputs, compile) go to ``TorchBackend`` as they are.
    """
    from inferkit.backends.torch import TorchBackend  # noqa: PLC0415  (optional extra)

    if (module is None) == (factory is None):
        msg = "give exactly one of module and factory"
        raise TypeError(msg)
    devices = _devices(device) or ("cpu",)
    pipe = pipeline_of(pipeline, preprocess, postprocess)
    turn = itertools.count()

    def make() -> Backend:
        net = copy.deepcopy(module) if factory is None else factory()
        where = devices[next(turn) % len(devices)]
        return _wrap(TorchBackend(net, device=where, **options), pipe)

    return make


def callable_factory(
    fn: Callable[[Any], Any] | None,
    factory: Callable[[], Callable[[Any], Any]] | None,
    inputs: Sequence[TensorSpec] | None,
    outputs: Sequence[TensorSpec],
    pipeline: Pipeline | None,
    preprocess: Callable[[Any], Any] | None,
    postprocess: Callable[[Any], Any] | None,
) -> tuple[BackendFactory, Signature | None]:
    """A ``CallableBackend`` per call, and the signature callers are checked against (None: the backend's)."""
    if (fn is None) == (factory is None):
        msg = "give exactly one of fn and factory"
        raise TypeError(msg)
    signature = Signature(tuple(inputs), tuple(outputs)) if inputs is not None else None
    pipe = pipeline_of(pipeline, preprocess, postprocess)

    def make() -> Backend:
        return _wrap(CallableBackend(fn if fn is not None else factory(), signature), pipe)  # type: ignore[misc]

    caller = signature if pipe is None else None  # read from the wrapped backend: the pipeline's view
    return make, caller


def batching_config(
    batching: BatchConfig | None, max_batch_size: int | None, max_delay_ms: float, max_queue_size: int
) -> BatchConfig:
    """``batching``, or a config of the separate keywords; never both."""
    given = (max_batch_size, max_delay_ms, max_queue_size)
    if batching is None:
        return BatchConfig(*given)
    if given != (BATCHING.max_batch_size, BATCHING.max_delay_ms, BATCHING.max_queue_size):
        msg = "give batching= or max_batch_size/max_delay_ms/max_queue_size, not both"
        raise TypeError(msg)
    return batching


def pool_config(
    pool: PoolConfig | None, replicas: int, balancing: str | Balancer, execution_timeout: float | None
) -> PoolConfig:
    """``pool``, or a config of the separate keywords; never both."""
    if pool is None:
        return PoolConfig(replicas, balancing, execution_timeout)
    if (replicas, balancing, execution_timeout) != (POOL.replicas, POOL.balancing, POOL.execution_timeout):
        msg = "give pool= or replicas/balancing/execution_timeout, not both"
        raise TypeError(msg)
    return pool


def _devices(device: str | Sequence[str] | None) -> tuple[str, ...] | None:
    if device is None:
        return None
    from inferkit.backends.device import placement  # noqa: PLC0415

    return placement(device)


def pipeline_of(
    pipeline: Pipeline | None, preprocess: Callable[[Any], Any] | None, postprocess: Callable[[Any], Any] | None
) -> Pipeline | None:
    """The pipeline to wrap replicas in, or ``None``; ``inferkit.gpu`` is imported only here, on use."""
    if pipeline is not None and (preprocess is not None or postprocess is not None):
        msg = "give pipeline= or preprocess=/postprocess=, not both (a Pipeline takes functions as steps)"
        raise TypeError(msg)
    if pipeline is not None:
        return pipeline
    if preprocess is None and postprocess is None:
        return None
    from inferkit.gpu.pipeline import Pipeline  # noqa: PLC0415

    pre, post = (() if f is None else (f,) for f in (preprocess, postprocess))
    return Pipeline(pre=pre, post=post)


def _wrap(backend: Backend, pipeline: Pipeline | None) -> Backend:
    """``backend`` behind its pipeline, and on a GPU behind the wrapper that halves out-of-memory batches."""
    if pipeline is None and backend.device == "cpu":
        return backend
    from inferkit.backends.pipeline import PipelineBackend  # noqa: PLC0415

    return PipelineBackend(backend, pipeline)


def _warmup_sizes(max_batch_size: int) -> tuple[int, ...]:
    sizes = {1, max_batch_size}
    size = 2
    while size < max_batch_size:
        sizes.add(size)
        size *= 2
    return tuple(sorted(sizes))
