"""A predictor's constructors: :meth:`~inferkit.Predictor.from_onnx`, ``from_torch``, ``from_callable``.

Their keyword arguments, defaults and documentation, turned into one backend factory and whole
configs (:mod:`inferkit._factories`); kept apart from :mod:`inferkit.predictor`, which owns a
built predictor's requests and life.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from inferkit._factories import (
    BATCHING,
    POOL,
    batching_config,
    callable_factory,
    onnx_factory,
    pool_config,
    torch_factory,
)

if TYPE_CHECKING:
    from inferkit.backends.base import BackendFactory
    from inferkit.batching import BatchConfig
    from inferkit.events import Observer
    from inferkit.gpu.pipeline import Pipeline
    from inferkit.pool import Balancer, PoolConfig
    from inferkit.signature import TensorSpec

__all__ = ["Constructors"]


class Constructors:
    """``from_onnx``, ``from_torch`` and ``from_callable`` (a mixin of :class:`~inferkit.Predictor`)."""

    if TYPE_CHECKING:  # provided by the predictor: ``Predictor.__init__``

        def __init__(self, factory: BackendFactory, **options: Any) -> None: ...

    @classmethod
    def from_onnx(
        cls,
        model: str | os.PathLike[str] | bytes,
        *,
        max_batch_size: int | None = BATCHING.max_batch_size,
        max_delay_ms: float = BATCHING.max_delay_ms,
        max_queue_size: int = BATCHING.max_queue_size,
        replicas: int = POOL.replicas,
        balancing: str | Balancer = POOL.balancing,
        execution_timeout: float | None = POOL.execution_timeout,
        providers: Sequence[Any] | None = None,
        session_options: Any = None,
        intra_op_threads: int | None = None,
        warmup: bool = True,
        name: str | None = None,
        observers: Sequence[Observer] = (),
        pool: PoolConfig | None = None,
        batching: BatchConfig | None = None,
        device: str | Sequence[str] | None = None,
        strict: bool = False,
        provider_options: Mapping[str, Mapping[str, Any]] | None = None,
        tensorrt: bool = False,
        pipeline: Pipeline | None = None,
        preprocess: Callable[[Any], Any] | None = None,
        postprocess: Callable[[Any], Any] | None = None,
    ) -> Self:
        """Serve an ONNX model (a path or its bytes) with ONNX Runtime.

        ``device`` places the replicas: ``"cpu"``, ``"cuda:N"``, ``"cuda"`` (replica *i* on
        visible GPU *i mod n*) or a list of devices cycled the same way; ``None`` keeps ONNX
        Runtime's choice (CUDA when it offers it). ``tensorrt`` puts TensorRT before CUDA;
        ``provider_options`` maps a provider name to its options. A GPU that cannot be used is a
        :class:`~inferkit.DeviceFallbackWarning` and the replica runs on the CPU, or with
        ``strict=True`` a :class:`~inferkit.DeviceUnavailable` error. ``pipeline`` (an
        :class:`inferkit.gpu.Pipeline`) or ``preprocess``/``postprocess`` (functions of a batch)
        run on each batch on the replica's device, and the predictor's :attr:`signature` is then
        what callers send (uint8 images for :class:`inferkit.gpu.ImageToTensor`).

        Each replica opens its own session. ``intra_op_threads`` defaults to what keeps
        ``replicas`` sessions from oversubscribing the cores (one core is left to the callers
        when there are several); with that default, a run of batches of at least half a full
        batch (:attr:`BatchConfig.full_rows`), and batches of one caller at a time, go to a second
        session of the replica that uses every core (the callers are waiting then, not computing),
        for models up to 512 MiB (a third, whose threads keep spinning between runs, serves a lone
        caller on its own thread for models up to 64 MiB). ``warmup`` runs each power-of-two batch size up to a
        call's most rows (:attr:`BatchConfig.call_rows`) once per replica before the predictor is
        ready (see :class:`~inferkit.backends.onnx.OnnxBackend` for where it stops early).
        ``providers`` and ``session_options`` go to ``onnxruntime.InferenceSession`` as they are.
        ``pool`` is a whole :class:`PoolConfig` (ejection settings included) in place of
        ``replicas``, ``balancing`` and ``execution_timeout``, and ``batching`` a whole
        :class:`BatchConfig` in place of ``max_batch_size``, ``max_delay_ms`` and ``max_queue_size``.
        """
        batching = batching_config(batching, max_batch_size, max_delay_ms, max_queue_size)
        pool = pool_config(pool, replicas, balancing, execution_timeout)
        if name is None:
            name = "model" if isinstance(model, bytes) else Path(model).stem
        factory = onnx_factory(
            model,
            replicas=pool.replicas,
            batching=batching,
            warmup=warmup,
            device=device,
            pipeline=pipeline,
            preprocess=preprocess,
            postprocess=postprocess,
            intra_op_threads=intra_op_threads,
            session_options=session_options,
            providers=providers,
            provider_options=provider_options,
            tensorrt=tensorrt,
            strict=strict,
        )
        return cls(factory, batching=batching, pool=pool, name=name, observers=observers)

    @classmethod
    def from_torch(
        cls,
        module: Any = None,
        *,
        factory: Callable[[], Any] | None = None,
        inputs: Sequence[TensorSpec] | None = None,
        outputs: Sequence[TensorSpec] = (),
        device: str | Sequence[str] = "cpu",
        compile: bool | Mapping[str, Any] = False,  # noqa: A002  (torch's own word)
        max_batch_size: int | None = BATCHING.max_batch_size,
        max_delay_ms: float = BATCHING.max_delay_ms,
        max_queue_size: int = BATCHING.max_queue_size,
        replicas: int = POOL.replicas,
        balancing: str | Balancer = POOL.balancing,
        execution_timeout: float | None = POOL.execution_timeout,
        name: str = "model",
        observers: Sequence[Observer] = (),
        pool: PoolConfig | None = None,
        batching: BatchConfig | None = None,
        pipeline: Pipeline | None = None,
        preprocess: Callable[[Any], Any] | None = None,
        postprocess: Callable[[Any], Any] | None = None,
    ) -> Self:
        """Serve a PyTorch ``nn.Module`` (the ``torch`` extra), in eval and inference mode.

        Give ``module`` (each replica gets its own deep copy, moved to its device) or
        ``factory`` (called once per replica). ``inputs``/``outputs`` declare the signature as
        in :meth:`from_callable`; the module takes the inputs positionally in that order.
        ``device``, ``pipeline``, ``preprocess`` and ``postprocess`` as in :meth:`from_onnx`;
        ``compile`` as in :class:`~inferkit.backends.torch.TorchBackend`.
        """
        make = torch_factory(
            module, factory, device, pipeline, preprocess, postprocess, inputs=inputs, outputs=outputs, compile=compile
        )
        batching = batching_config(batching, max_batch_size, max_delay_ms, max_queue_size)
        pool = pool_config(pool, replicas, balancing, execution_timeout)
        return cls(make, batching=batching, pool=pool, name=name, observers=observers)

    @classmethod
    def from_callable(
        cls,
        fn: Callable[[Any], Any] | None = None,
        *,
        factory: Callable[[], Callable[[Any], Any]] | None = None,
        inputs: Sequence[TensorSpec] | None = None,
        outputs: Sequence[TensorSpec] = (),
        max_batch_size: int | None = BATCHING.max_batch_size,
        max_delay_ms: float = BATCHING.max_delay_ms,
        max_queue_size: int = BATCHING.max_queue_size,
        replicas: int = POOL.replicas,
        balancing: str | Balancer = POOL.balancing,
        execution_timeout: float | None = POOL.execution_timeout,
        name: str = "model",
        observers: Sequence[Observer] = (),
        pool: PoolConfig | None = None,
        batching: BatchConfig | None = None,
        pipeline: Pipeline | None = None,
        preprocess: Callable[[Any], Any] | None = None,
        postprocess: Callable[[Any], Any] | None = None,
    ) -> Self:
        """Serve a Python function over NumPy arrays.

        Give ``fn``, a thread-safe function that every replica shares, or ``factory``, called
        once per replica to make that replica's function. The function takes one array (one
        input) or a dict of arrays and returns one array or a dict of arrays, each with a row
        per input row. With ``inputs`` (and optionally ``outputs``) requests are validated
        like an ONNX model's; without, they only need to be arrays whose leading dimensions
        agree, and requests batch together when their other dimensions and dtypes match.
        Replicas share the GIL, so only functions that release it (NumPy, native code) run in
        parallel. ``pool`` is a whole :class:`PoolConfig`, as in :meth:`from_onnx`. ``pipeline``,
        ``preprocess`` and ``postprocess`` as in :meth:`from_onnx`, on the CPU (the NumPy twins);
        ``inputs``/``outputs`` then describe the function, and callers send what the pipeline takes.
        """
        make, caller = callable_factory(fn, factory, inputs, outputs, pipeline, preprocess, postprocess)
        batching = batching_config(batching, max_batch_size, max_delay_ms, max_queue_size)
        pool = pool_config(pool, replicas, balancing, execution_timeout)
        return cls(make, batching=batching, pool=pool, signature=caller, name=name, observers=observers)
