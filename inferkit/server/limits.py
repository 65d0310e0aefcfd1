"""How much one client connection may hold: :class:`ConnectionLimits`, for both faces."""

from __future__ import annotations

from typing import Any

import attrs

from inferkit._validators import integer, number

__all__ = ["ConnectionLimits"]


_INT32_MAX = 2**31 - 1  # gRPC takes its options as C ints: past it, OverflowError at start
_MAX_GRPC_IDLE_S = _INT32_MAX // 1000  # grpc.max_connection_idle_ms: 2147483 s, about 24.8 days


def _optional_connections(_: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None:
        integer(1, _INT32_MAX)(_, attribute, value)  # gRPC's becomes a C int


def _grpc_idle(_: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    number(0, inclusive=False)(_, attribute, value)
    if value > _MAX_GRPC_IDLE_S:
        msg = f"{attribute.name} must be at most {_MAX_GRPC_IDLE_S} (2**31 - 1 milliseconds), got {value!r}"
        raise ValueError(msg)


@attrs.frozen
class ConnectionLimits:
    """What one client connection may hold, so that no client can lock others out.

    ==============================  ===========================================================
    ``header_timeout_s``            seconds a new connection, or a started request, has to send
                                    its whole request head (HTTP 408 and close after it)
    ``body_timeout_s``              seconds a request body may stall between two reads (408)
    ``keep_alive_s``                seconds an idle HTTP keep-alive connection stays open
    ``max_header_bytes``            bytes of an HTTP request head (URL and headers; 431 past
                                    it), and of a gRPC call's metadata (at most 2**31 - 1)
    ``max_connections``             open HTTP connections; past it the oldest idle one is
                                    closed, or the new one gets 503 when none is idle. ``None``:
                                    half the open-file limit, at most 10,000
    ``grpc_max_connections``        open gRPC connections, shared out among the listeners
                                    (each takes its share, rounded up); past its share a
                                    listener closes a new one as it accepts it (the client sees
                                    UNAVAILABLE). ``None``: a quarter of the open-file limit,
                                    at most 10,000
    ``grpc_idle_s``                 seconds a gRPC connection without calls stays open (at
                                    most 2147483, 2**31 - 1 milliseconds: about 24.8 days)
    ``grpc_max_concurrent_streams`` gRPC calls in progress on one connection (at most 2**31 - 1)
    ``grpc_message_timeout_s``      seconds a gRPC call has, once opened, to send its whole
                                    request message (DEADLINE_EXCEEDED and the call ends)
    ``max_request_bytes``           bytes of a REST body, also once decompressed (413 past it)
    ``max_json_bytes``              bytes of a REST body's JSON part (413: send binary data),
                                    and of a gRPC message besides its raw contents
    ``max_decode_bytes``            estimated memory of the large REST bodies being decoded,
                                    answers being encoded and bodies being inflated at once
                                    (413 for one that never fits, 429/503 while busy); gRPC has
                                    its own for typed contents and BYTES elements
    ``max_message_bytes``           bytes of a gRPC message, both ways (at most 2**31 - 1)
    ==============================  ===========================================================
    """

    header_timeout_s: float = attrs.field(default=10.0, validator=number(0, inclusive=False))
    body_timeout_s: float = attrs.field(default=30.0, validator=number(0, inclusive=False))
    keep_alive_s: float = attrs.field(default=5.0, validator=number(0, inclusive=False))
    max_header_bytes: int = attrs.field(default=32 * 2**10, validator=integer(1024, _INT32_MAX))
    max_connections: int | None = attrs.field(default=None, validator=_optional_connections)
    grpc_max_connections: int | None = attrs.field(default=None, validator=_optional_connections)
    grpc_idle_s: float = attrs.field(default=300.0, validator=_grpc_idle)
    grpc_max_concurrent_streams: int = attrs.field(default=1024, validator=integer(1, _INT32_MAX))
    grpc_message_timeout_s: float = attrs.field(default=60.0, validator=number(0, inclusive=False))
    max_request_bytes: int = attrs.field(default=64 * 2**20, validator=integer(1))
    max_json_bytes: int = attrs.field(default=16 * 2**20, validator=integer(1))
    max_decode_bytes: int = attrs.field(default=2**30, validator=integer(1))
    max_message_bytes: int = attrs.field(default=256 * 2**20, validator=integer(1, _INT32_MAX))
