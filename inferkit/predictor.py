"""The user's object: a model behind a thread-safe, batched ``predict``."""

from __future__ import annotations

import asyncio
import enum
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self, cast

import attrs

from inferkit._bridge import deliver_to
from inferkit._bulk_faces import BulkFaces
from inferkit._factories import (
    BATCHING,
    POOL,
    batching_config,
    callable_factory,
    onnx_factory,
    pool_config,
    torch_factory,
)
from inferkit._process import Forked, track
from inferkit.arrays import batch_key
from inferkit.backends.base import Backend, BackendFactory
from inferkit.batching import BatchConfig, Batcher, Request, RequestFuture
from inferkit.batching.request import level_of, seconds_of
from inferkit.errors import DeadlineExceeded, InferkitError
from inferkit.events import Event, LogObserver, Observer, StateChanged, deliver, new_request_id
from inferkit.pool import Balancer, PoolConfig
from inferkit.signature import Signature, TensorSpec, normalize_untyped
from inferkit.stats import Stats

if TYPE_CHECKING:
    from inferkit.gpu.pipeline import Pipeline

__all__ = ["Predictor", "State"]


_RECHECK_S = 0.05  # how often a second close() looks whether the first was interrupted
_observing = threading.local()  # .predictor: the predictor whose observers run on this thread now


def _always() -> bool:
    return True


class State(enum.Enum):
    """A predictor's lifecycle."""

    STARTING = "starting"  # loading replicas
    READY = "ready"  # taking requests
    DRAINING = "draining"  # close() called: finishing what was accepted, taking nothing new
    CLOSED = "closed"  # every thread stopped


class Predictor(BulkFaces):
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
            verbose=_always if observers else self._log.enabled,  # the user's observers get every event
        )
        try:
            first = self._batcher.backends()[0]
            self.signature: Signature | None = signature if signature is not None else first.signature
            """The input and output specs requests are checked against (None: untyped callable)."""
            self.device: str = first.device
            """Where the model runs, read from the loaded backend."""
            sig = self.signature
            if sig is None or any(d is None for s in sig.inputs for d in s.shape[1:]):  # requests may differ
                self._batcher.key_by(batch_key)
        except BaseException:  # a backend whose signature or device raised: no one could close its workers
            self._batcher.close(0)
            raise
        track(self)  # closed at exit, disowned in a forked child
        self._set_state(State.READY)

    # -- construction ----------------------------------------------------------------------

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
    ) -> Predictor:
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
        make, caller = callable_factory(fn, factory, inputs, outputs, pipeline, preprocess, postprocess)
        batching = batching_config(batching, max_batch_size, max_delay_ms, max_queue_size)
        pool = pool_config(pool, replicas, balancing, execution_timeout)
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
        request = self._request(x, timeout, priority)
        waiter = asyncio.get_running_loop().create_future()
        request.awaiter = deliver_to(waiter)  # no concurrent.futures.Future in between
        self._batcher.put(request)
        if request.deadline is not None:
            self._batcher.expire_at(request, request.deadline)
        try:
            return await waiter
        except asyncio.CancelledError:
            self._batcher.cancel(request)
            raise

    def _request(self, x: Any, timeout: float | None, priority: int) -> Request:
        try:
            sig = self.signature
            arrays = sig.normalize(x) if sig is not None else normalize_untyped(x)
            if timeout is not None:
                timeout = seconds_of(timeout)
                if not timeout > 0:
                    msg = f"the deadline passed before the request was queued (timeout={timeout!r})"
                    raise DeadlineExceeded(msg)
        except InferkitError as error:
            self._batcher.reject(error)
            raise
        if not isinstance(priority, int):
            priority = level_of(priority)
        now = time.monotonic()
        rows = next(iter(arrays.values())).shape[0]
        deadline = None if timeout is None else now + timeout
        return Request(new_request_id(self.name), arrays, rows, None, priority, deadline, now)

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
        """The batching settings in force (changed by :meth:`configure`)."""
        return self._batcher.config

    @property
    def pool(self) -> PoolConfig:
        """The pool settings it was built with: replicas at start, balancing, timeouts, ejection."""
        return self._batcher.pool

    def backends(self) -> tuple[Backend, ...]:
        """The loaded backends of the replicas now in the pool, in the order of ``stats().replicas``.

        For inspection (device, a GPU backend's stream and transfer counts): a backend's ``run``
        belongs to its replica's worker, and is not to be called from outside.
        """
        return self._batcher.backends()

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
        still queued after ``timeout`` seconds ends in ``Closed``. ``RuntimeError`` from an
        observer: it runs on the thread of the batch it hears about, which close would wait for.
        """
        if getattr(_observing, "predictor", None) is self:
            msg = f"close() of predictor {self.name!r} from its own observer would wait for itself; call it elsewhere"
            raise RuntimeError(msg)
        with self._close_lock:
            first = not self._closing
            self._closing = True
        if not first:  # wait for the first; if it was interrupted (Ctrl-C), finish the job ourselves
            end = None if timeout is None else time.monotonic() + timeout
            while True:
                left = None if end is None else max(0.0, end - time.monotonic())
                if self._closed.wait(_RECHECK_S if left is None else min(_RECHECK_S, left)) or left == 0.0:
                    return
                if not self._closing:
                    self.close(left)
                    return
        self._set_state(State.DRAINING)
        try:
            self._batcher.close(timeout)
        except BaseException:  # interrupted (Ctrl-C): still draining, and a later close() finishes the job
            with self._close_lock:
                self._closing = False
            raise
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

    def _forked(self) -> None:
        """In a forked child (``os.fork``): closed, every call refused with ``Closed`` saying why."""
        self._batcher = cast("Batcher", Forked(self.name, os.getppid()))
        self._close_lock = threading.Lock()  # a thread of the parent may have held it at the fork
        self._closing = True
        self._state = State.CLOSED
        self._closed = threading.Event()
        self._closed.set()

    def _emit(self, event: Event) -> None:
        outer = getattr(_observing, "predictor", None)  # another predictor's, when its observer called us
        _observing.predictor = self  # what close() refuses while an observer runs
        try:
            deliver(self._observers, event)
        finally:
            _observing.predictor = outer
