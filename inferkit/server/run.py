"""Running the REST and gRPC faces together, and shutting them down gracefully."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Callable, Coroutine, Iterator, Mapping
from typing import Any, TypeVar

import uvicorn

from inferkit.routing import Predictive
from inferkit.server.grpc import DEFAULT_LISTENERS, create_server
from inferkit.server.metrics import Metrics
from inferkit.server.repository import Repository
from inferkit.server.rest import create_app

__all__ = ["LOOPS", "InferenceServer", "run_loop", "serve"]

T = TypeVar("T")
LOOPS = ("auto", "asyncio", "uvloop")
"""Event loops :class:`InferenceServer` runs on: uvloop when installed (``auto``), or the one named."""


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handlers: the host (or our CLI) decides about signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class InferenceServer:
    """The REST app (uvicorn) and the gRPC server over one :class:`Repository`, on one event loop.

    :meth:`run` serves until :meth:`stop` (or SIGTERM/SIGINT with ``handle_signals``); the
    shutdown is graceful: readiness turns false, both listeners stop accepting, requests in
    flight are answered, then every model is closed. ``grpc_port=None`` serves REST only;
    port 0 picks a free port (see :attr:`port` and :attr:`grpc_port` once :attr:`started`).
    ``grpc_listeners`` is :func:`~inferkit.server.grpc.create_server`'s ``listeners``;
    ``loop`` picks the event loop of :meth:`start` and :func:`serve` (one of :data:`LOOPS`).
    """

    def __init__(
        self,
        repository: Repository,
        *,
        host: str = "127.0.0.1",
        port: int = 8000,
        grpc_port: int | None = 8001,
        metrics: Metrics | None = None,
        max_request_bytes: int = 64 * 2**20,
        max_message_bytes: int = 256 * 2**20,
        overload_status: int = 503,
        retry_after_s: float = 1.0,
        grace: float = 30.0,
        log_level: str = "warning",
        grpc_listeners: int = DEFAULT_LISTENERS,
        loop: str = "auto",
    ) -> None:
        if loop not in LOOPS:
            msg = f"loop must be one of {LOOPS}, got {loop!r}"
            raise ValueError(msg)
        self.repository = repository
        self.host = host
        self.port = port
        self.grpc_port = grpc_port
        self.grace = grace
        self.metrics = metrics if metrics is not None else Metrics(repository)
        self.max_message_bytes = max_message_bytes
        self.grpc_listeners = grpc_listeners
        self.loop = loop
        app = create_app(
            repository,
            metrics=self.metrics,
            max_request_bytes=max_request_bytes,
            overload_status=overload_status,
            retry_after_s=retry_after_s,
        )
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False, lifespan="off")
        self._http = _Uvicorn(config)
        self.started = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    async def run(
        self, *, handle_signals: bool = False, on_start: Callable[[InferenceServer], None] | None = None
    ) -> None:
        """Serve until stopped, then shut down gracefully; ``on_start`` is called once both listen."""
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._loop.add_signal_handler(sig, self._stop.set)
        grpc_server = None
        if self.grpc_port is not None:
            grpc_server, self.grpc_port = create_server(
                self.repository,
                host=self.host,
                port=self.grpc_port,
                metrics=self.metrics,
                max_message_bytes=self.max_message_bytes,
                listeners=self.grpc_listeners,
            )
            await grpc_server.start()
        http = asyncio.create_task(self._http.serve())
        while not self._http.started and not http.done():  # noqa: ASYNC110 (uvicorn has no start event)
            await asyncio.sleep(0.005)
        if http.done():
            await http  # raises why it could not start
        self.port = self._http.servers[0].sockets[0].getsockname()[1]
        self.started.set()
        if on_start is not None:
            on_start(self)
        await self._stop.wait()
        self.repository.draining = True
        self._http.should_exit = True
        stops = [http]
        if grpc_server is not None:
            stops.append(asyncio.ensure_future(grpc_server.stop(self.grace)))
        await asyncio.gather(*stops)
        await asyncio.get_running_loop().run_in_executor(None, self.repository.close, self.grace)

    def stop(self) -> None:
        """Begin a graceful shutdown; safe from any thread."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)

    def start(self, timeout: float = 30.0) -> InferenceServer:
        """Serve on a background thread (for embedding and tests); returns once both listen."""
        self._thread = threading.Thread(
            target=lambda: run_loop(self.run(), self.loop), name="inferkit-server", daemon=True
        )
        self._thread.start()
        if not self.started.wait(timeout):
            msg = "the server did not start in time"
            raise TimeoutError(msg)
        return self

    def join(self, timeout: float | None = None) -> None:
        """Stop a background server and wait for its graceful shutdown."""
        self.stop()
        if self._thread is not None:
            self._thread.join(timeout)


def serve(
    target: Predictive | Repository | Mapping[str, Predictive],
    *,
    name: str = "model",
    host: str = "127.0.0.1",
    port: int = 8000,
    grpc_port: int | None = 8001,
    **options: Any,
) -> None:
    """Serve a Predictor, a Router, a mapping of them by name, or a Repository until SIGTERM/SIGINT.

    Blocks. ``options`` go to :class:`InferenceServer` (``max_request_bytes``,
    ``max_message_bytes``, ``overload_status``, ``retry_after_s``, ``grace``, ``log_level``,
    ``metrics``, ``grpc_listeners``, ``loop``).
    """
    if isinstance(target, Repository):
        repository = target
    elif isinstance(target, Mapping):
        repository = Repository(target)
    else:
        repository = Repository({name: target})
    server = InferenceServer(repository, host=host, port=port, grpc_port=grpc_port, **options)
    main = threading.current_thread() is threading.main_thread()
    run_loop(server.run(handle_signals=main), server.loop)


def run_loop(main: Coroutine[Any, Any, T], loop: str = "auto") -> T:
    """Run ``main`` to completion on a new event loop: uvloop with ``"auto"`` when it is installed."""
    factory = None
    if loop != "asyncio":
        try:
            import uvloop  # noqa: PLC0415 (optional: part of the server extra where it builds)
        except ImportError:
            if loop == "uvloop":
                raise
        else:
            factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
