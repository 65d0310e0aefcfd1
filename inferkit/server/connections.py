"""Bounding HTTP connections: uvicorn's httptools protocol with timeouts, size and count limits, and a drain.

:class:`~inferkit.server.run.InferenceServer` gives uvicorn a :func:`guarded_protocol` per server, whose
connections share one :class:`Connections`; the limits are :class:`~inferkit.server.config.ConnectionLimits`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any, ClassVar

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from inferkit.server.limits import ConnectionLimits

__all__ = ["Connections", "default_max_connections", "guarded_protocol"]

_LINGER_S = 2.0  # after a refusal, read and drop what the client still sends: it sees the answer, not a reset
_DRAIN_IDLE_S = 0.25  # on shutdown an idle connection stays open this long: a request already sent is answered
_MAX_DEFAULT_CONNECTIONS = 10_000
_SHUTTING_DOWN = json.dumps({"error": "the server is shutting down; retry on another"}).encode()


def default_max_connections(open_files: int | None, share: int = 2) -> int:
    """``1 / share`` of the open-file limit, at most 10,000: HTTP's half, gRPC's quarter (the rest is the process's)."""
    if open_files is None:
        return _MAX_DEFAULT_CONNECTIONS
    return max(8, min(_MAX_DEFAULT_CONNECTIONS, open_files // share))


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


class Connections:
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

    shared: ClassVar[Connections]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.timeout_keep_alive = self.shared.limits.keep_alive_s  # type: ignore[assignment] # call_later takes it
        self._timer: asyncio.TimerHandle | None = None
        self._in_head = True  # reading a request head (or waiting for the first one)
        self._head_bytes = 0
        self._chunk = 0
        self._began = False  # a request head began in the chunk being read
        self._head_later = 0  # bytes of the head in the chunks after the one it began in
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
        self._began = False
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
        if not self._in_head:
            return
        if self._began:  # at most this chunk, which may also end the requests pipelined before it: not refused on
            self._head_bytes = len(data)  # that alone (on_headers_complete sizes the head exactly)
            return
        self._head_bytes += len(data)
        self._head_later += len(data)
        if self._head_later > self.shared.limits.max_header_bytes:
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
        self._began = True
        self._head_bytes = self._head_later = 0
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


def guarded_protocol(connections: Connections) -> type[HttpToolsProtocol]:
    """The bounded protocol class for uvicorn's ``http``, its connections sharing ``connections``."""
    return type("Guarded", (_Guarded,), {"shared": connections})
