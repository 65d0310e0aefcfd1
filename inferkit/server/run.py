"""Running the REST and gRPC faces together, bounding connections, and shutting down gracefully."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import signal
import threading
from collections.abc import Callable, Coroutine, Iterator, Mapping
from typing import Any, ClassVar, TypeVar

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from inferkit.routing import Predictive
from inferkit.server.config import ConnectionLimits
from inferkit.server.control import RepositoryControl
from inferkit.server.grpc import DEFAULT_LISTENERS, create_server
from inferkit.server.logs import RequestLog
from inferkit.server.metrics import Metrics
from inferkit.server.repository import Repository
from inferkit.server.rest import create_app

__all__ = ["LOOPS", "InferenceServer", "loopback", "raise_open_file_limit", "run_loop", "serve"]

T = TypeVar("T")
LOOPS = ("auto", "asyncio", "uvloop")
"""Event loops :class:`InferenceServer` runs on: uvloop when installed (``auto``), or the one named."""

_LINGER_S = 2.0  # after a refusal, read and drop what the client still sends: it sees the answer, not a reset
_DRAIN_IDLE_S = 0.25  # on shutdown an idle connection stays open this long: a request already sent is answered
_FORCE_S = 1.0  # past the grace period: time for aborted connections and cancelled calls to unwind
_MAX_DEFAULT_CONNECTIONS = 10_000
_SHUTTING_DOWN = json.dumps({"error": "the server is shutting down; retry on another"}).encode()


def raise_open_file_limit() -> int | None:
    """Raise this process's soft limit on open files to its hard limit where allowed; the soft limit now.

    ``None`` where there is no such limit (Windows). At the common soft limit of 1,024, idle
    connections alone can use up the descriptors, and then accepting fails for everyone.
    """
    try:
        import resource  # noqa: PLC0415 (POSIX only)
    except ImportError:  # pragma: no cover
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 2**20
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):  # e.g. macOS caps it below an unlimited hard limit
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return None if soft == resource.RLIM_INFINITY else soft


def loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine (``127.0.0.1``, ``::1``, ``localhost``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name other than localhost: it may resolve to anything
        return False


def default_max_connections(open_files: int | None) -> int:
    """Half the open-file limit (the rest is for gRPC, models and the process), at most 10,000."""
    if open_files is None:
        return _MAX_DEFAULT_CONNECTIONS
    return max(8, min(_MAX_DEFAULT_CONNECTIONS, open_files // 2))


async def _shutting_down(scope: Any, receive: Any, send: Any) -> None:
    """503 and close, once the body is read (closing on unread data would reset the connection)."""
    del scope
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        more = message.get("more_body", False)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(_SHUTTING_DOWN)).encode()),
        (b"retry-after", b"1"),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": _SHUTTING_DOWN})


class _Connections:
    """What one server's HTTP connections share: the limits, the idle ones, whether it drains."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.max_connections = limits.max_connections or default_max_connections(None)
        self.idle: dict[_Guarded, None] = {}  # in the order they became idle: the oldest first
        self.draining = False


class _Guarded(HttpToolsProtocol):
    """uvicorn's httptools protocol, bounded.

    It adds a header timeout, a header size limit, a body stall timeout, a connection limit
    that closes idle connections first, and a drain that answers 503 instead of resetting
    connections. ``shared`` is set on a subclass made per server.
    """

    shared: ClassVar[_Connections]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.timeout_keep_alive = self.shared.limits.keep_alive_s  # type: ignore[assignment] # call_later takes it
        self._timer: asyncio.TimerHandle | None = None
        self._in_head = True  # reading a request head (or waiting for the first one)
        self._head_bytes = 0
        self._chunk = 0
        self._last_read = 0.0
        self._refused = False

    # -- connection ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        shared = self.shared
        over = len(self.connections) - shared.max_connections
        for other in list(shared.idle)[:over]:  # the oldest idle ones make room
            shared.idle.pop(other, None)
            self.connections.discard(other)
            other.transport.close()
            over -= 1
        if over > 0:  # every other connection is busy: no room
            self.connections.discard(self)
            self._answer(503, "too many connections; retry later")
            self.transport.close()
            return
        shared.idle[self] = None
        self._arm(shared.limits.header_timeout_s, self._head_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.shared.idle.pop(self, None)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # lingering after a refusal: drop it
        self._unset_keepalive_if_required()
        self._chunk = len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if not self._refused:
                self.logger.warning("Invalid HTTP request received.")
                self.send_400_response("Invalid HTTP request received.")
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        if self._in_head:
            self._head_bytes += len(data)
            if self._head_bytes > self.shared.limits.max_header_bytes:
                self._refuse(431, f"the request head is over max_header_bytes={self.shared.limits.max_header_bytes}")

    def shutdown(self) -> None:
        """Drain: a busy connection closes after its answer, an idle one after a moment.

        In that moment a request already on its way is answered 503 rather than reset.
        """
        if self.cycle is None or self.cycle.response_complete:
            self.loop.call_later(_DRAIN_IDLE_S, self._close_if_idle)
        else:
            self.cycle.keep_alive = False

    def _close_if_idle(self) -> None:
        idle = (self.cycle is None or self.cycle.response_complete) and not (self._in_head and self._head_bytes)
        if idle and not self.transport.is_closing():
            self.transport.close()

    # -- parser callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_bytes = 0
        self._arm(self.shared.limits.header_timeout_s, self._head_timeout)

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._in_head = False
        self._disarm()
        limit = self.shared.limits.max_header_bytes
        if self._head_bytes + self._chunk > limit:  # only then is the exact size worth counting
            size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
            if size > limit:
                self._refuse(431, f"the request head is over max_header_bytes={limit}")
                return
        self.shared.idle.pop(self, None)
        if self.shared.draining:
            self.app = _shutting_down
        super().on_headers_complete()
        self._last_read = self.loop.time()
        self._arm(self.shared.limits.body_timeout_s, self._body_timeout)

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            self._last_read = self.loop.time()  # the stall timer looks at it, rather than re-arm per chunk
            super().on_body(body)

    def on_message_complete(self) -> None:
        if not self._refused:
            self._disarm()
            super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self.shared.idle[self] = None

    # -- timers and refusals -------------------------------------------------------------

    def _arm(self, seconds: float, callback: Callable[[], None]) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _head_timeout(self) -> None:
        self._timer = None
        limit = self.shared.limits.header_timeout_s
        self._refuse(408, f"the request head did not arrive within header_timeout_s={limit}")

    def _body_timeout(self) -> None:
        self._timer = None
        limit = self.shared.limits.body_timeout_s
        stalled = self.loop.time() - self._last_read
        if self.flow.read_paused or stalled < limit:  # the app is not reading yet, or data came
            self._arm(limit - stalled if stalled < limit else limit, self._body_timeout)
            return
        self._refuse(408, f"the request body stalled for body_timeout_s={limit}")

    def _refuse(self, status: int, message: str) -> None:
        """Answer ``status`` and close, reading (and dropping) what comes meanwhile for a while."""
        if self._refused or self.transport.is_closing():
            return
        self._refused = True
        self._disarm()
        self.shared.idle.pop(self, None)
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if cycle.response_started:
                self.transport.close()
                return
            cycle.disconnected = True  # the app's receive() gets http.disconnect; its send() is dropped
            cycle.message_event.set()
        self._answer(status, message)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.flow.resume_reading()
        self.loop.call_later(_LINGER_S, self.transport.close)

    def _answer(self, status: int, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        head = b"content-type: application/json\r\nconnection: close\r\ncontent-length: %d\r\n\r\n" % len(body)
        self.transport.write(STATUS_LINE[status] + head + body)


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handlers: the host (or our CLI) decides about signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class InferenceServer:
    """The REST app (uvicorn) and the gRPC server over one :class:`Repository`, on one event loop.

    :meth:`run` serves until :meth:`stop` (or SIGTERM/SIGINT with ``handle_signals``); the
    shutdown is graceful and bounded by ``grace`` seconds: readiness turns false, both
    listeners stop accepting, new requests on open connections are answered unavailable
    (HTTP 503 with ``Connection: close``, gRPC UNAVAILABLE), requests in flight are answered,
    then every model is closed; what is still open at ``grace`` is closed. ``limits`` bounds
    what each client connection may hold (see :class:`~inferkit.server.config.ConnectionLimits`);
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
        if loop not in LOOPS:
            msg = f"loop must be one of {LOOPS}, got {loop!r}"
            raise ValueError(msg)
        self.repository = repository
        self.host = host
        self.port = port
        self.grpc_port = grpc_port
        self.grace = grace
        self.metrics = metrics if metrics is not None else Metrics(repository)
        self.grpc_listeners = grpc_listeners
        self.loop = loop
        self.limits = limits if limits is not None else ConnectionLimits()
        self.control = control if control is not None else RepositoryControl()
        self.status_page = loopback(host) if status_page is None else status_page
        self._connections = _Connections(self.limits)
        self.request_log = RequestLog(access=access_log)  # request scopes always; access lines when asked
        protocol = type("Guarded", (_Guarded,), {"shared": self._connections})
        app = create_app(
            repository,
            metrics=self.metrics,
            max_request_bytes=self.limits.max_request_bytes,
            max_json_bytes=self.limits.max_json_bytes,
            max_decode_bytes=self.limits.max_decode_bytes,
            overload_status=overload_status,
            retry_after_s=retry_after_s,
            control=self.control,
            request_log=self.request_log,
            status_page=self.status_page,
        )
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level=log_level,
            access_log=False,
            lifespan="off",
            http=protocol,
            timeout_graceful_shutdown=max(1, int(grace)),  # run() bounds it exactly
        )
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
        if self.limits.max_connections is None:
            self._connections.max_connections = default_max_connections(raise_open_file_limit())
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
                max_message_bytes=self.limits.max_message_bytes,
                listeners=self.grpc_listeners,
                limits=self.limits,
                control=self.control,
                request_log=self.request_log,
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
        await self._shutdown(http, grpc_server)

    async def _shutdown(self, http: asyncio.Task[None], grpc_server: Any) -> None:
        """Drain both faces within ``grace``, force what is left, then close the models."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.grace
        self.repository.draining = True
        self._connections.draining = True
        self._http.should_exit = True  # uvicorn closes its listener and calls shutdown() on each connection
        stops: list[asyncio.Future[None]] = [http]
        if grpc_server is not None:
            stops.append(asyncio.ensure_future(grpc_server.stop(self.grace)))
        _, pending = await asyncio.wait(stops, timeout=self.grace)
        if pending:  # a slow upload, or a request still running: the grace period is over
            self._http.force_exit = True
            for connection in list(self._http.server_state.connections):
                connection.transport.abort()
            for task in list(self._http.server_state.tasks):
                task.cancel()
            _, late = await asyncio.wait(pending, timeout=_FORCE_S)
            for future in late:
                future.cancel()
        for stop in stops:
            if stop.done() and not stop.cancelled() and stop.exception() is not None:
                raise stop.exception()  # type: ignore[misc]
        left = max(0.0, deadline - loop.time())
        await loop.run_in_executor(None, self.repository.close, left)
        self.request_log.close()

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
