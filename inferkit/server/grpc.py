"""The gRPC face: the KServe Open Inference Protocol v2 over ``grpc.aio``, as Triton speaks it.

:func:`create_server` serves a :class:`~inferkit.server.Repository` as Triton's
``inference.GRPCInferenceService`` (ServerLive, ServerReady, ModelReady, ServerMetadata,
ModelMetadata, ModelInfer, ModelConfig, ModelStatistics, RepositoryIndex,
RepositoryModelLoad, RepositoryModelUnload), so Triton's clients (``tritonclient.grpc``) work
unchanged::

    server, port = create_server(repository, port=8001)  # a GrpcServer: grpc.aio listeners on one port
    await server.start()
    ...
    await server.stop(grace=5)

ModelInfer, beyond the protocol:

- Inputs come from ``raw_input_contents`` (one entry per input, in input order) or from each
  input's typed ``contents``; outputs always go out in ``raw_output_contents``, in the order of
  the request's ``outputs`` (every output when it names none).
- The sticky key of a :class:`~inferkit.Router` is the ``inferkit-key`` metadata, else the
  request parameter ``key`` (a string, or an integer taken as its string, as over REST). The arm
  that served the request is the response parameter ``arm`` and the trailing metadata
  ``inferkit-arm``.
- ``model_version`` pins that version; empty, the model's target (a Router) decides.
- The request parameters ``timeout`` (microseconds; the gRPC deadline bounds it too),
  ``priority`` (Triton's levels) and ``key`` are read by
  :func:`inferkit.server.protocol.request_options`, as over REST.
- A client that cancels, or whose deadline passes, cancels its request if it is still queued.
- Once :meth:`GrpcServer.stop` begins, ModelInfer answers UNAVAILABLE ("shutting down") while
  calls already running finish.
- Errors map as :func:`inferkit.server.protocol.grpc_code` says: a bad request is
  INVALID_ARGUMENT (a message that does not parse included), an unknown model or version
  NOT_FOUND, overload UNAVAILABLE, a passed deadline DEADLINE_EXCEEDED, a model failure INTERNAL.

ModelConfig and ModelStatistics answer what REST's ``/config`` and ``/stats`` answer
(:meth:`Repository.config <inferkit.server.Repository.config>`, :meth:`Repository.stats
<inferkit.server.Repository.stats>`). RepositoryModelLoad and RepositoryModelUnload follow
:mod:`inferkit.server.control`: off unless enabled, then the ``authorization`` metadata must
carry ``Bearer <token>`` (UNAUTHENTICATED without, PERMISSION_DENIED when wrong).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from typing import Any

import grpc

from inferkit.server.connections import default_max_connections
from inferkit.server.control import Controller, RepositoryControl, controller_of
from inferkit.server.grpc_servicer import Servicer
from inferkit.server.limits import ConnectionLimits
from inferkit.server.logs import RequestLog
from inferkit.server.protocol import ARM, KEY
from inferkit.server.repository import Repository
from inferkit.server.sockets import addresses, check_free, endpoint, open_file_limit

__all__ = ["ARM_METADATA", "DEFAULT_LISTENERS", "KEY_METADATA", "GrpcServer", "create_server"]

KEY_METADATA = KEY
"""The gRPC metadata key that carries a request's sticky routing key."""
ARM_METADATA = ARM
"""The trailing metadata key that names the arm which served a request."""

_INT32_MAX = 2**31 - 1

_QUIET_S = 0.1  # on stop: no new call for this long, and calls in transit have all been answered
_KEEPALIVE_MS = 60_000  # ping idle clients this often: a dead peer's connection is closed
_KEEPALIVE_TIMEOUT_MS = 20_000

DEFAULT_LISTENERS = 8 if sys.platform == "linux" else 1
MAX_LISTENERS = 64
"""The most listeners on one port: each is a grpc.aio server with its own threads and descriptors."""
"""Listeners :func:`create_server` opens by default: 8 where SO_REUSEPORT spreads connections (Linux)."""


class GrpcServer:
    """The ``grpc.aio`` servers listening on one port, started and stopped together.

    ``grpc.aio`` accepts one call per event-loop round trip, which caps a busy server well
    below what its handlers can do; each extra listener adds an accept loop, and the kernel
    spreads connections across them (SO_REUSEPORT). It spreads connections, not calls, and
    clients hold few (tritonclient shares one per process), so the default has more listeners
    than a server usually sees connections: four connections all land on different listeners
    two times in five with eight listeners, one in ten with four. An idle listener costs a
    socket and a pending accept. ``servers`` are the underlying ``grpc.aio.Server`` objects,
    for adding other services to each.
    """

    def __init__(self, servers: Sequence[grpc.aio.Server], servicer: Servicer | None = None) -> None:
        self.servers = tuple(servers)
        self._servicer = servicer

    async def start(self) -> None:
        """Start every listener."""
        for server in self.servers:
            await server.start()

    async def stop(self, grace: float | None) -> None:
        """Drain, then stop: all of it within ``grace`` seconds (``None``: cancel calls at once).

        New ModelInfer calls are answered UNAVAILABLE at once while running ones go on; once no
        call has arrived for a moment (at most half of ``grace``), the listeners stop: GOAWAY
        to clients, and calls still running get the rest of ``grace``, then are cancelled.
        grpc cancels calls that reached a server but no handler yet, so stopping while clients
        still send would end calls sent before the shutdown CANCELLED instead of UNAVAILABLE.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (grace or 0.0)
        servicer = self._servicer
        if servicer is not None and grace:
            servicer.draining = True
            servicer.last_call = loop.time()
            quiet_until = min(loop.time() + grace / 2, deadline)
            # a timer, not a poll: each call that arrives moves the end of the quiet window on
            while (wake := min(servicer.last_call + _QUIET_S, quiet_until)) > loop.time():  # noqa: ASYNC110
                await asyncio.sleep(wake - loop.time())
        left = None if grace is None else max(0.0, deadline - loop.time())
        await asyncio.gather(*(server.stop(left) for server in self.servers))

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        """Wait until every listener has stopped (or ``timeout`` passes); whether they all did."""
        done = await asyncio.gather(*(server.wait_for_termination(timeout) for server in self.servers))
        return all(done)


def create_server(
    repository: Repository,
    *,
    host: str = "127.0.0.1",
    port: int = 8001,
    metrics: Any = None,
    max_message_bytes: int = 256 * 2**20,
    listeners: int = DEFAULT_LISTENERS,
    limits: ConnectionLimits | None = None,
    control: RepositoryControl | Controller | None = None,
    request_log: RequestLog | None = None,
) -> tuple[GrpcServer, int]:
    """A gRPC server for ``repository``, not yet started, and the port it is bound to.

    ``port=0`` picks a free port. Call it in the event loop that will run the server, then
    ``await server.start()`` and, to finish, ``await server.stop(grace)``. ``metrics``, when
    given, has ``observe(model, arm, outcome, seconds)`` called once per ModelInfer with the
    outcome ``"success"`` or the error's class name. ``max_message_bytes`` bounds a request and
    a response (both ways; gRPC's default is 4 MiB), at most ``2**31 - 1``. ``listeners``
    ``grpc.aio`` servers share the port (see :class:`GrpcServer`); a port that another
    process listens on is an error (``RuntimeError``) either way, never a silent share.
    ``limits`` bounds metadata (``max_header_bytes``), idle connections (``grpc_idle_s``),
    calls per connection (``grpc_max_concurrent_streams``), connections (``grpc_max_connections``,
    shared out among the listeners) and the time a call has to send its
    request message (``grpc_message_timeout_s``); clients are pinged every 60 s so
    that a vanished one's connection is closed. ``control`` turns on RepositoryModelLoad and
    RepositoryModelUnload (see :mod:`inferkit.server.control`); off by default; a
    :class:`~inferkit.server.control.Controller` shares it with the REST app.
    """
    limits = limits if limits is not None else ConnectionLimits()
    if type(max_message_bytes) is not int or not 1 <= max_message_bytes <= _INT32_MAX:
        msg = f"max_message_bytes must be an int in [1, {_INT32_MAX}], got {max_message_bytes!r}"
        raise ValueError(msg)
    if type(listeners) is not int or not 1 <= listeners <= MAX_LISTENERS:
        msg = f"listeners must be an int from 1 to {MAX_LISTENERS}, got {listeners!r}"
        raise ValueError(msg)
    shared = listeners > 1
    connections = limits.grpc_max_connections or default_max_connections(open_file_limit(), 4)
    resolved = addresses(host)  # as the REST face binds them (grpc's own resolver may find others)
    if port != 0:  # shared: SO_REUSEPORT would otherwise join a listener of the same user; either way a clear error
        for address in resolved:
            check_free(address, port)
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", int(shared)),
        ("grpc.max_metadata_size", limits.max_header_bytes),
        ("grpc.absolute_max_metadata_size", limits.max_header_bytes),
        ("grpc.max_connection_idle_ms", max(1, int(limits.grpc_idle_s * 1000))),  # under 1 ms rounds up, never to 0
        ("grpc.max_concurrent_streams", limits.grpc_max_concurrent_streams),
        ("grpc.max_allowed_incoming_connections", -(-connections // listeners)),  # each listener's share
        ("grpc.keepalive_time_ms", _KEEPALIVE_MS),
        ("grpc.keepalive_timeout_ms", _KEEPALIVE_TIMEOUT_MS),
    ]
    servicer = Servicer(repository, metrics, controller_of(repository, control), limits)
    if request_log is not None:
        servicer.pipeline.log = request_log
    handler = servicer.handler()
    servers = []
    for _ in range(listeners):
        server = grpc.aio.server(options=options)
        server.add_generic_rpc_handlers((handler,))
        for address in resolved:
            port = server.add_insecure_port(endpoint(address, port))  # port 0 picks one; the others join it
        servers.append(server)
    return GrpcServer(servers, servicer), port
