"""Running the REST and gRPC faces together, and shutting down gracefully.

HTTP connections are bounded by :mod:`inferkit.server.connections`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import attrs
import uvicorn

from inferkit.routing import Predictive
from inferkit.server.config import check_grace
from inferkit.server.connections import Connections, default_max_connections, guarded_protocol
from inferkit.server.control import Controller, RepositoryControl
from inferkit.server.grpc import DEFAULT_LISTENERS, GrpcServer, create_server
from inferkit.server.lifecycle import Lifecycle
from inferkit.server.limits import ConnectionLimits
from inferkit.server.logs import RequestLog
from inferkit.server.loops import LOOPS, known_loop, run_loop
from inferkit.server.metrics import Metrics
from inferkit.server.repository import Repository
from inferkit.server.rest import create_app
from inferkit.server.sockets import endpoint, listen, loopback, raise_open_file_limit
from inferkit.server.workers import Workers

__all__ = ["LOOPS", "InferenceServer", "loopback", "raise_open_file_limit", "run_loop", "serve"]


_FORCE_S = 1.0  # past the grace period: time for aborted connections and cancelled calls to unwind
_log = logging.getLogger(__name__)


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handlers: the host (or our CLI) decides about signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class _CutOff:
    """The REST app, quiet about the requests a shutdown cuts off at the end of its grace period.

    uvicorn logs each cancelled request as "Exception in ASGI application" with a traceback;
    the server logs one line for all of them instead.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self.cutting = False

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await self.app(scope, receive, send)
        except asyncio.CancelledError:
            if not self.cutting:
                raise


def _grace(value: object) -> float:
    return check_grace(value, "grace")


@attrs.frozen(kw_only=True)
class _Settings:
    """What :class:`InferenceServer` was asked for, under its constructor's names, defaults filled in.

    Frozen, so no lock: read from any thread.
    """

    host: str
    port: int
    grpc_port: int | None
    grace: float = attrs.field(converter=_grace)  # 1e300 crashed the shutdown
    log_level: str
    grpc_listeners: int
    loop: str = attrs.field(validator=known_loop)
    limits: ConnectionLimits
    control: RepositoryControl
    status_page: bool
    access_log: bool
    overload_status: int
    retry_after_s: float


@attrs.frozen(kw_only=True)
class _Ports:
    """The ports served on: those asked for, then the bound ones (port 0 picks a free one).

    Replaced whole by :meth:`InferenceServer.run` on the serving loop, no lock: it is final
    before ``started`` is set, and that :class:`threading.Event` publishes it to other threads.
    """

    rest: int
    grpc: int | None


class InferenceServer:
    """The REST app (uvicorn) and the gRPC server over one :class:`Repository`, on one event loop.

    :meth:`run` serves until :meth:`stop` (or SIGTERM/SIGINT with ``handle_signals``); the
    shutdown is graceful and bounded by ``grace`` seconds: readiness turns false, both
    listeners stop accepting, new requests on open connections are answered unavailable
    (HTTP 503 with ``Connection: close``, gRPC UNAVAILABLE), requests in flight are answered,
    then every model is closed; what is still open at ``grace`` is closed. ``limits`` bounds
    what each client connection may hold (see :class:`~inferkit.server.limits.ConnectionLimits`);
    :meth:`run` raises the soft open-file limit first (:func:`raise_open_file_limit`) and,
    unless ``limits.max_connections`` is set, allows half of it to HTTP connections.
    ``grpc_port=None`` serves REST only;
    port 0 picks a free port (see :attr:`port` and :attr:`grpc_port` once :attr:`started`).
    ``grpc_listeners`` is :func:`~inferkit.server.grpc.create_server`'s ``listeners``;
    ``loop`` picks the event loop of :meth:`start` and :func:`serve` (one of :data:`LOOPS`).
    ``control`` turns on loading and unloading models over both protocols (Triton's model
    repository extension, see :mod:`inferkit.server.control`); off by default.
    ``status_page`` serves the status page at ``/`` (see :mod:`inferkit.server.status`);
    ``None`` (the default) turns it on only when ``host`` is a loopback address.
    ``log_level`` is the level of uvicorn's loggers (``uvicorn.error``, ``uvicorn.access``,
    ``uvicorn.asgi``); the server configures no other logging (no handlers, no ``dictConfig``).
    A server serves once: :meth:`start` or :meth:`run` again raises ``RuntimeError`` (after a
    port in use, build another over the same :class:`Repository`); with ``handle_signals`` the host's SIGTERM and
    SIGINT handlers are restored when :meth:`run` returns.
    """

    def __init__(
        self,
        repository: Repository,
        *,
        host: str = "127.0.0.1",
        port: int = 8000,
        grpc_port: int | None = 8001,
        metrics: Metrics | None = None,
        overload_status: int = 503,
        retry_after_s: float = 1.0,
        grace: float = 30.0,
        log_level: str = "warning",
        grpc_listeners: int = DEFAULT_LISTENERS,
        loop: str = "auto",
        limits: ConnectionLimits | None = None,
        control: RepositoryControl | None = None,
        access_log: bool = False,
        status_page: bool | None = None,
    ) -> None:
        settings = _Settings(
            host=host,
            port=port,
            grpc_port=grpc_port,
            grace=grace,
            log_level=log_level,
            grpc_listeners=grpc_listeners,
            loop=loop,
            limits=limits if limits is not None else ConnectionLimits(),
            control=control if control is not None else RepositoryControl(),
            status_page=loopback(host) if status_page is None else status_page,
            access_log=access_log,
            overload_status=overload_status,
            retry_after_s=retry_after_s,
        )
        self.repository = repository
        self.metrics = metrics if metrics is not None else Metrics(repository)
        self._settings = settings
        self._ports = _Ports(rest=settings.port, grpc=settings.grpc_port)
        self._lifecycle = Lifecycle()
        self._connections = Connections(settings.limits)
        self.request_log = RequestLog(access=settings.access_log)  # request scopes always; access lines when asked
        self._controller = Controller(repository, settings.control)  # one for both faces: changes take turns
        app = create_app(
            repository,
            metrics=self.metrics,
            max_request_bytes=settings.limits.max_request_bytes,
            max_json_bytes=settings.limits.max_json_bytes,
            max_decode_bytes=settings.limits.max_decode_bytes,
            overload_status=settings.overload_status,
            retry_after_s=settings.retry_after_s,
            control=self._controller,
            request_log=self.request_log,
            status_page=settings.status_page,
        )
        self._app = _CutOff(app)
        config = uvicorn.Config(
            self._app,
            host=settings.host,
            port=settings.port,
            log_config=None,  # uvicorn's own would dictConfig the host's logging (closing its handlers)
            log_level=settings.log_level,
            access_log=False,
            lifespan="off",
            http=guarded_protocol(self._connections),
            timeout_graceful_shutdown=max(1, int(settings.grace)),  # run() bounds it exactly
        )
        self._http = _Uvicorn(config)

    # The settings under their constructor's names; port and grpc_port are the bound ones once started.
    @property
    def host(self) -> str:
        """The address both faces listen on."""
        return self._settings.host

    @property
    def port(self) -> int:
        """The REST port: the one asked for, and once :attr:`started` the one bound (port 0 picks one)."""
        return self._ports.rest

    @property
    def grpc_port(self) -> int | None:
        """The gRPC port (``None``: REST only): the one asked for, and once :attr:`started` the one bound."""
        return self._ports.grpc

    @property
    def grace(self) -> float:
        """Seconds a graceful shutdown may take."""
        return self._settings.grace

    @property
    def grpc_listeners(self) -> int:
        """:func:`~inferkit.server.grpc.create_server`'s ``listeners``."""
        return self._settings.grpc_listeners

    @property
    def loop(self) -> str:
        """The event loop of :meth:`start` and :func:`serve`, one of :data:`LOOPS`."""
        return self._settings.loop

    @property
    def limits(self) -> ConnectionLimits:
        """What each client connection may hold."""
        return self._settings.limits

    @property
    def control(self) -> RepositoryControl:
        """Loading and unloading models over both protocols."""
        return self._settings.control

    @property
    def status_page(self) -> bool:
        """Whether ``/`` serves the status page."""
        return self._settings.status_page

    @property
    def started(self) -> threading.Event:
        """Set once both faces listen."""
        return self._lifecycle.started

    async def run(
        self, *, handle_signals: bool = False, on_start: Callable[[InferenceServer], None] | None = None
    ) -> None:
        """Serve until stopped, then shut down gracefully; ``on_start`` is called once both listen.

        ``OSError`` naming the address when a face cannot listen (a port in use): then nothing
        listens and the models stay open, the caller's to close (or serve on other ports).
        """
        stop = self._lifecycle.begin(handle_signals=handle_signals)
        try:
            await self._serve(stop, on_start)
        finally:
            self._lifecycle.end()  # the host's own SIGTERM/SIGINT handlers again

    async def _serve(self, stop: asyncio.Event, on_start: Callable[[InferenceServer], None] | None) -> None:
        settings = self._settings
        if settings.limits.max_connections is None:
            self._connections.max_connections = default_max_connections(raise_open_file_limit())
        listeners = listen(settings.host, settings.port, self._http.config.backlog)
        grpc_server = None
        try:
            if settings.grpc_port is not None:
                grpc_server = self._grpc(settings.grpc_port)
                await grpc_server.start()
            http = asyncio.create_task(self._http.serve(sockets=listeners))
            while not self._http.started and not http.done():  # noqa: ASYNC110 (uvicorn has no start event)
                await asyncio.sleep(0.005)
            if http.done():
                await http  # raises why it could not start
        except BaseException:  # nothing listens on: stop what started (gRPC's listeners outlived the loop)
            for listener in listeners:
                listener.close()
            if grpc_server is not None:
                await grpc_server.stop(None)
            raise
        self._ports = attrs.evolve(self._ports, rest=listeners[0].getsockname()[1])
        self._lifecycle.started.set()  # publishes the bound ports to the threads waiting on it
        if on_start is not None:
            on_start(self)
        await stop.wait()
        await self._shutdown(http, grpc_server)

    def _grpc(self, port: int) -> GrpcServer:
        """The gRPC server, bound (its port published); ``OSError`` naming the address when it cannot be."""
        settings = self._settings
        try:
            server, bound = create_server(
                self.repository,
                host=settings.host,
                port=port,
                metrics=self.metrics,
                max_message_bytes=settings.limits.max_message_bytes,
                listeners=settings.grpc_listeners,
                limits=settings.limits,
                control=self._controller,
                request_log=self.request_log,
            )
        except RuntimeError as error:  # grpc's word for an address it cannot bind
            msg = f"cannot serve gRPC on {endpoint(settings.host, port)}: {error}"
            raise OSError(msg) from None
        self._ports = attrs.evolve(self._ports, grpc=bound)
        return server

    async def _shutdown(self, http: asyncio.Task[None], grpc_server: GrpcServer | None) -> None:
        """Drain both faces within ``grace``, force what is left, then close the models."""
        loop = asyncio.get_running_loop()
        grace = self._settings.grace
        deadline = loop.time() + grace
        self.repository.draining = True
        self._connections.draining = True
        self._controller.stop()  # loads and unloads not yet running are refused now
        self._http.should_exit = True  # uvicorn closes its listener and calls shutdown() on each connection
        stops: list[asyncio.Future[None]] = [http]
        if grpc_server is not None:
            stops.append(asyncio.ensure_future(grpc_server.stop(grace)))
        _, pending = await asyncio.wait(stops, timeout=grace)
        if pending:  # a slow upload, or a request still running: the grace period is over
            self._http.force_exit = True
            self._app.cutting = True
            for connection in list(self._http.server_state.connections):
                connection.transport.abort()
            cut = list(self._http.server_state.tasks)
            for task in cut:
                task.cancel()
            _log.warning(
                "the grace period of %.3g s is over: cutting off %d HTTP requests still running", grace, len(cut)
            )
            _, late = await asyncio.wait(pending, timeout=_FORCE_S)
            for future in late:
                future.cancel()
        for stop in stops:
            if stop.done() and not stop.cancelled() and stop.exception() is not None:
                raise stop.exception()  # type: ignore[misc]
        left = max(0.0, deadline - loop.time())
        closer = Workers(1, "inferkit-server-close")  # not queued behind the decodes of requests cut off
        try:
            await loop.run_in_executor(closer, self.repository.close, left)
        finally:
            closer.shutdown()
        self.request_log.close()

    def stop(self) -> None:
        """Begin a graceful shutdown; safe from any thread."""
        self._lifecycle.stop()

    def start(self, timeout: float = 30.0) -> InferenceServer:
        """Serve on a background thread (for embedding and tests); returns once both listen.

        Raises what kept it from starting (``OSError`` for a port in use, as :meth:`run`).
        """
        self._lifecycle.start_thread(lambda: run_loop(self.run(), self._settings.loop), timeout)
        return self

    def join(self, timeout: float | None = None) -> None:
        """Stop a background server and wait for its graceful shutdown."""
        self._lifecycle.join(timeout)


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

    Blocks. ``options`` go to :class:`InferenceServer` (``limits``, ``overload_status``,
    ``retry_after_s``, ``grace``, ``log_level``, ``metrics``, ``grpc_listeners``, ``loop``,
    ``control``, ``status_page``).
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
