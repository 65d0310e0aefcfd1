"""The user's object: a model behind a thread-safe, batched ``predict``."""

from __future__ import annotations

import copy
import enum
import itertools
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import attrs

from inferkit._bridge import await_future
from inferkit.backends.base import Backend, BackendFactory
from inferkit.backends.callable import CallableBackend
from inferkit.batching import BatchConfig, Batcher, Request, RequestFuture
from inferkit.errors import DeadlineExceeded, InferkitError
from inferkit.events import Event, LogObserver, Observer, StateChanged, deliver
from inferkit.pool import Balancer, PoolConfig
from inferkit.signature import Signature, TensorSpec, batch_key, normalize_untyped
from inferkit.stats import Stats

if TYPE_CHECKING:
    from inferkit.bulk import OnError, Progress
    from inferkit.gpu.pipeline import Pipeline

__all__ = ["Predictor", "State"]

_BATCHING = BatchConfig()  # every batching and pool default is the config class's, written once
_POOL = PoolConfig()


class State(enum.Enum):
    """A predictor's lifecycle."""

    STARTING = "starting"  # loading replicas
    READY = "ready"  # taking requests
    DRAINING = "draining"  # close() called: finishing what was accepted, taking nothing new
    CLOSED = "closed"  # every thread stopped


class Predictor:
    """A model served in-process: validated, batched with every other caller, run on replicas.

    Build one with :meth:`from_onnx` or :meth:`from_callable`, call :meth:`predict` from any
    number of threads (or :meth:`submit` for a future, :meth:`apredict` from asyncio), and
    :meth:`close` it, or use it as a context manager.

    Inputs are one array when the model has one input, else a dict of arrays by input name;
    axis 0 is the batch. Results are one array when the model has one output, else a dict.
    ``timeout`` is a deadline in seconds: a request still queued when it passes ends in
    ``DeadlineExceeded`` and never runs. ``priority``: higher runs first, default 0.
    """

    def __init__(
        self,
        factory: BackendFactory,
        *,
        batching: BatchConfig | None = None,
        pool: PoolConfig | None = None,
        signature: Signature | None = None,
        name: str = "model",
        observers: Sequence[Observer] = (),
    ) -> None:
        self.name = name
        self._log = LogObserver()
        self._observers = (*observers, self._log)
        self._user_observers = bool(observers)
        self._close_lock = threading.Lock()
        self._closed = threading.Event()
        self._closing = False
        self._set_state(State.STARTING)
        self._batcher = Batcher(
            factory,
            batching or BatchConfig(),
            pool or PoolConfig(),
            name=name,
            emit=self._emit,
            verbose=self._verbose,
        )
        first = self._batcher.backends()[0]
        self.signature: Signature | None = signature if signature is not None else first.signature
        """The input and output specs requests are checked against (None: untyped callable)."""
        self.device: str = first.device
        """Where the model runs, read from the loaded backend."""
        sig = self.signature
        self._keyed = sig is None or any(d is None for s in sig.inputs for d in s.shape[1:])
        self._set_state(State.READY)

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def from_onnx(
        cls,
        model: str | os.PathLike[str] | bytes,
        *,
        max_batch_size: int = _BATCHING.max_batch_size,
        max_delay_ms: float = _BATCHING.max_delay_ms,
        max_queue_size: int = _BATCHING.max_queue_size,
        replicas: int = _POOL.replicas,
        balancing: str | Balancer = _POOL.balancing,
        execution_timeout: float | None = _POOL.execution_timeout,
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
    ) -> Predictor:
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
        when there are several). ``warmup`` runs each power-of-two batch size up to
        ``max_batch_size`` once per replica before the predictor is ready. ``providers`` and
        ``session_options`` go to ``onnxruntime.InferenceSession`` as they are. ``pool`` is a
        whole :class:`PoolConfig` (ejection settings included) in place of ``replicas``,
        ``balancing`` and ``execution_timeout``, and ``batching`` a whole :class:`BatchConfig`
        in place of ``max_batch_size``, ``max_delay_ms`` and ``max_queue_size``.
        """
        from inferkit.backends.onnx import OnnxBackend, default_intra_op_threads  # noqa: PLC0415

        batching = _batching(batching, max_batch_size, max_delay_ms, max_queue_size)
        pool = _pool(pool, replicas, balancing, execution_timeout)
        threads = intra_op_threads
        if threads is None and session_options is None:
            threads = default_intra_op_threads(pool.replicas)
        sizes = _warmup_sizes(batching.max_batch_size) if warmup else ()
        if name is None:
            name = "model" if isinstance(model, bytes) else Path(model).stem

        devices = _devices(device)
        pipe = _pipeline(pipeline, preprocess, postprocess)
        turn = itertools.count()

        def factory() -> Backend:
            backend = OnnxBackend(
                model,
                device=None if devices is None else devices[next(turn) % len(devices)],
                providers=providers,
                provider_options=provider_options,
                tensorrt=tensorrt,
                strict=strict,
                session_options=session_options,
                intra_op_threads=threads,
                warmup=sizes,
            )
            return _wrap(backend, pipe)

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
        max_batch_size: int = _BATCHING.max_batch_size,
        max_delay_ms: float = _BATCHING.max_delay_ms,
        max_queue_size: int = _BATCHING.max_queue_size,
        replicas: int = _POOL.replicas,
        balancing: str | Balancer = _POOL.balancing,
        execution_timeout: float | None = _POOL.execution_timeout,
        name: str = "model",
        observers: Sequence[Observer] = (),
        pool: PoolConfig | None = None,
        batching: BatchConfig | None = None,
        pipeline: Pipeline | None = None,
        preprocess: Callable[[Any], Any] | None = None,
        postprocess: Callable[[Any], Any] | None = None,
    ) -> Predictor:
        """Serve a PyTorch ``nn.Module`` (the ``torch`` extra), in eval and inference mode.

        Give ``module`` (each replica gets its own deep copy, moved to its device) or
        ``factory`` (called once per replica). ``inputs``/``outputs`` declare the signature as
        in :meth:`from_callable`; the module takes the inputs positionally in that order.
        ``device``, ``pipeline``, ``preprocess`` and ``postprocess`` as in :meth:`from_onnx`;
        ``compile`` as in :class:`~inferkit.backends.torch.TorchBackend`.
        """
        from inferkit.backends.torch import TorchBackend  # noqa: PLC0415  (optional extra)

        if (module is None) == (factory is None):
            msg = "give exactly one of module and factory"
            raise TypeError(msg)
        devices = _devices(device) or ("cpu",)
        pipe = _pipeline(pipeline, preprocess, postprocess)
        turn = itertools.count()

        def make() -> Backend:
            net = copy.deepcopy(module) if factory is None else factory()
            where = devices[next(turn) % len(devices)]
            return _wrap(TorchBackend(net, device=where, inputs=inputs, outputs=outputs, compile=compile), pipe)

        batching = _batching(batching, max_batch_size, max_delay_ms, max_queue_size)
        pool = _pool(pool, replicas, balancing, execution_timeout)
        return cls(make, batching=batching, pool=pool, name=name, observers=observers)

    @classmethod
    def from_callable(
        cls,
        fn: Callable[[Any], Any] | None = None,
        *,
        factory: Callable[[], Callable[[Any], Any]] | None = None,
        inputs: Sequence[TensorSpec] | None = None,
        outputs: Sequence[TensorSpec] = (),
        max_batch_size: int = _BATCHING.max_batch_size,
        max_delay_ms: float = _BATCHING.max_delay_ms,
        max_queue_size: int = _BATCHING.max_queue_size,
        replicas: int = _POOL.replicas,
        balancing: str | Balancer = _POOL.balancing,
        execution_timeout: float | None = _POOL.execution_timeout,
        name: str = "model",
        observers: Sequence[Observer] = (),
        pool: PoolConfig | None = None,
        batching: BatchConfig | None = None,
        pipeline: Pipeline | None = None,
        preprocess: Callable[[Any], Any] | None = None,
        postprocess: Callable[[Any], Any] | None = None,
    ) -> Predictor:
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
        if (fn is None) == (factory is None):
            msg = "give exactly one of fn and factory"
            raise TypeError(msg)
        signature = Signature(tuple(inputs), tuple(outputs)) if inputs is not None else None
        pipe = _pipeline(pipeline, preprocess, postprocess)

        def make() -> Backend:
            return _wrap(CallableBackend(fn if fn is not None else factory(), signature), pipe)  # type: ignore[misc]

        batching = _batching(batching, max_batch_size, max_delay_ms, max_queue_size)
        pool = _pool(pool, replicas, balancing, execution_timeout)
        caller = signature if pipe is None else None  # read from the wrapped backend: the pipeline's view
        return cls(make, batching=batching, pool=pool, signature=caller, name=name, observers=observers)

    # -- requests --------------------------------------------------------------------------

    def predict(self, x: Any, *, timeout: float | None = None, priority: int = 0) -> Any:
        """Run ``x`` batched with other callers' requests and return its result.

        Raises ``InvalidInput``, ``Overloaded``, ``Closed`` or ``NoHealthyReplica`` at once
        when the request is refused, and ``DeadlineExceeded``, ``ModelError`` (or its
        ``ExecutionTimeout``) when it fails after it was accepted.
        """
        return self._batcher.call(self._request(x, timeout, priority))

    def submit(self, x: Any, *, timeout: float | None = None, priority: int = 0) -> RequestFuture:
        """Queue ``x`` and return a :class:`concurrent.futures.Future` of its result.

        Refusals raise here, as in :meth:`predict`; failures after admission arrive through the
        future. ``future.cancel()`` on a queued request means it never runs.
        """
        request = self._request(x, timeout, priority)
        request.future = RequestFuture(request.id)
        self._batcher.put(request)
        if request.deadline is not None:
            self._batcher.expire_at(request, request.deadline)
        return request.future

    async def apredict(self, x: Any, *, timeout: float | None = None, priority: int = 0) -> Any:
        """:meth:`predict` for asyncio: awaits the result without blocking the event loop.

        A finished batch wakes the loop once for all of its requests awaited on that loop, not
        once per request; cancelling the awaiting task cancels a request still queued.
        """
        return await await_future(self.submit(x, timeout=timeout, priority=priority))

    def _request(self, x: Any, timeout: float | None, priority: int) -> Request:
        try:
            sig = self.signature
            arrays = sig.normalize(x) if sig is not None else normalize_untyped(x)
            if timeout is not None and not timeout > 0:
                msg = f"the deadline passed before the request was queued (timeout={timeout!r})"
                raise DeadlineExceeded(msg)
        except InferkitError as error:
            self._batcher.reject(error)
            raise
        if not isinstance(priority, int):
            msg = f"priority must be an int, got {priority!r}"
            raise TypeError(msg)
        now = time.monotonic()
        rows = next(iter(arrays.values())).shape[0]
        key = batch_key(arrays) if self._keyed else None
        deadline = None if timeout is None else now + timeout
        return Request(self._batcher.next_id(), arrays, rows, key, priority, deadline, now)

    def map(
        self,
        data: Any,
        *,
        batch_size: int = 256,
        in_flight: int = 8,
        on_error: OnError = "raise",
        progress: bool | Progress = False,
        timeout: float | None = None,
    ) -> Any:
        """Run every row of ``data`` and return all the results, in input order.

        ``data`` is an array or dict of arrays, a ``.npy`` path (memory-mapped), a ``.parquet``
        or ``.csv`` path (the ``bulk`` extra), or any iterable of batches. Batches of
        ``batch_size`` rows are read while earlier ones run, with at most ``in_flight`` queued
        or running at once, on every replica. ``on_error`` is ``"raise"``, ``"skip"`` (failing
        rows left out) or ``"collect"`` (left out, and a :class:`~inferkit.bulk.BulkResult`
        returned with each row's error); see :mod:`inferkit.bulk`. ``progress=True`` shows rows/s
        and the time left on stderr when it is a terminal. ``timeout`` applies to each batch.
        """
        from inferkit.bulk import map_batches  # noqa: PLC0415  (pyarrow and files only on use)

        return map_batches(
            self,
            data,
            batch_size=batch_size,
            in_flight=in_flight,
            on_error=on_error,
            progress=progress,
            timeout=timeout,
        )

    def stream(
        self,
        data: Any,
        *,
        batch_size: int = 256,
        in_flight: int = 8,
        on_error: OnError = "raise",
        progress: bool | Progress = False,
        timeout: float | None = None,
    ) -> Iterator[Any]:
        """:meth:`map` as an iterator: one result per batch, in input order, memory bounded by ``in_flight``.

        Stopping early cancels the batches still queued. With ``on_error="collect"`` each item
        is a :class:`~inferkit.bulk.BulkPart`.
        """
        from inferkit.bulk import stream_batches  # noqa: PLC0415

        return stream_batches(
            self,
            data,
            batch_size=batch_size,
            in_flight=in_flight,
            on_error=on_error,
            progress=progress,
            timeout=timeout,
        )

    # -- run-time changes ------------------------------------------------------------------

    def configure(
        self,
        *,
        max_batch_size: int | None = None,
        max_delay_ms: float | None = None,
        max_queue_size: int | None = None,
    ) -> None:
        """Change batching while serving; what is not given stays as it is."""
        changes = {
            k: v
            for k, v in (
                ("max_batch_size", max_batch_size),
                ("max_delay_ms", max_delay_ms),
                ("max_queue_size", max_queue_size),
            )
            if v is not None
        }
        self._batcher.reconfigure(attrs.evolve(self._batcher.config, **changes))  # type: ignore[arg-type]

    @property
    def batching(self) -> BatchConfig:
        """The batching settings in force."""
        return self._batcher.config

    def resize(self, replicas: int) -> None:
        """Grow or shrink the pool; removed replicas finish what they hold first."""
        self._batcher.resize(replicas)

    # -- lifecycle and observability --------------------------------------------------------

    @property
    def state(self) -> State:
        """Where the predictor is in its life."""
        return self._state

    @property
    def ready(self) -> bool:
        """True while the predictor takes requests and a replica can serve them (health checks)."""
        return self._state is State.READY and self._batcher.healthy()

    def stats(self) -> Stats:
        """A consistent snapshot of the counters, batch sizes and per-replica latency."""
        return self._batcher.stats(self._state.value)

    def close(self, timeout: float | None = None) -> None:
        """Stop taking requests, finish what was accepted, stop every thread.

        Idempotent and safe from several threads; later callers wait for the first. What is
        still queued after ``timeout`` seconds ends in ``Closed``.
        """
        with self._close_lock:
            first = not self._closing
            self._closing = True
        if not first:
            self._closed.wait(timeout)
            return
        self._set_state(State.DRAINING)
        try:
            self._batcher.close(timeout)
        finally:
            self._set_state(State.CLOSED)
            self._closed.set()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Predictor {self.name!r} {self._state.value} on {self.device}>"

    def _set_state(self, state: State) -> None:
        self._state = state
        self._emit(StateChanged(self.name, state.value))

    def _verbose(self) -> bool:
        return self._user_observers or self._log.enabled()

    def _emit(self, event: Event) -> None:
        deliver(self._observers, event)


def _batching(
    batching: BatchConfig | None, max_batch_size: int, max_delay_ms: float, max_queue_size: int
) -> BatchConfig:
    given = (max_batch_size, max_delay_ms, max_queue_size)
    if batching is None:
        return BatchConfig(*given)
    if given != (_BATCHING.max_batch_size, _BATCHING.max_delay_ms, _BATCHING.max_queue_size):
        msg = "give batching= or max_batch_size/max_delay_ms/max_queue_size, not both"
        raise TypeError(msg)
    return batching


def _pool(
    pool: PoolConfig | None, replicas: int, balancing: str | Balancer, execution_timeout: float | None
) -> PoolConfig:
    if pool is None:
        return PoolConfig(replicas, balancing, execution_timeout)
    if (replicas, balancing, execution_timeout) != (_POOL.replicas, _POOL.balancing, _POOL.execution_timeout):
        msg = "give pool= or replicas/balancing/execution_timeout, not both"
        raise TypeError(msg)
    return pool


def _devices(device: str | Sequence[str] | None) -> tuple[str, ...] | None:
    if device is None:
        return None
    from inferkit.backends.device import placement  # noqa: PLC0415

    return placement(device)


def _pipeline(
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
