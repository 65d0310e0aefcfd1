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
import functools
import socket
import sys
from collections.abc import Callable, Hashable, Sequence
from typing import Any, NoReturn

import grpc
import numpy as np
from google.protobuf import json_format

from inferkit.errors import Closed, InferkitError, InvalidInput
from inferkit.server import proto as pb
from inferkit.server.config import ConnectionLimits
from inferkit.server.control import Controller, RepositoryControl, load_parameters
from inferkit.server.logs import RequestLog
from inferkit.server.pipeline import Call, Pipeline, describe
from inferkit.server.protocol import (
    ARM,
    KEY,
    check_outputs,
    datatype_of,
    dtype_of,
    element_count,
    extensions,
    fit,
    from_raw,
    grpc_code,
    invalid,
    refuse_unsupported,
    request_options,
    server_version,
    shaped,
    to_raw,
)
from inferkit.server.repository import Failed, InferResult, Repository

__all__ = ["ARM_METADATA", "DEFAULT_LISTENERS", "KEY_METADATA", "GrpcServer", "create_server"]

Array = np.ndarray[Any, Any]

KEY_METADATA = KEY
"""The gRPC metadata key that carries a request's sticky routing key."""
ARM_METADATA = ARM
"""The trailing metadata key that names the arm which served a request."""

_INT32_MAX = 2**31 - 1
_OFFLOAD_BYTES = 2**20  # decode and encode larger messages on a worker thread, as REST does

# The InferTensorContents field that carries each datatype, and the dtype protobuf gives its
# values. FP16 has none: it travels in raw_input_contents only.
_CONTENTS: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_WIDE: dict[str, np.dtype[Any]] = {
    "bool_contents": np.dtype(np.bool_),
    "int_contents": np.dtype(np.int32),
    "int64_contents": np.dtype(np.int64),
    "uint_contents": np.dtype(np.uint32),
    "uint64_contents": np.dtype(np.uint64),
    "fp32_contents": np.dtype(np.float32),
    "fp64_contents": np.dtype(np.float64),
}
_OPTION_PARAMETERS = ("timeout", "priority", "key", "sequence_id", "sequence_start", "sequence_end")


_QUIET_S = 0.1  # on stop: no new call for this long, and calls in transit have all been answered
_KEEPALIVE_MS = 60_000  # ping idle clients this often: a dead peer's connection is closed
_KEEPALIVE_TIMEOUT_MS = 20_000

DEFAULT_LISTENERS = 8 if sys.platform == "linux" else 1
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

    def __init__(self, servers: Sequence[grpc.aio.Server], servicer: _Servicer | None = None) -> None:
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
    control: RepositoryControl | None = None,
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
    ``limits`` bounds metadata (``max_header_bytes``), idle connections (``grpc_idle_s``) and
    calls per connection (``grpc_max_concurrent_streams``); clients are pinged every 60 s so
    that a vanished one's connection is closed. ``control`` turns on RepositoryModelLoad and
    RepositoryModelUnload (see :mod:`inferkit.server.control`); off by default.
    """
    limits = limits if limits is not None else ConnectionLimits()
    if type(max_message_bytes) is not int or not 1 <= max_message_bytes <= _INT32_MAX:
        msg = f"max_message_bytes must be an int in [1, {_INT32_MAX}], got {max_message_bytes!r}"
        raise ValueError(msg)
    if type(listeners) is not int or listeners < 1:
        msg = f"listeners must be an int >= 1, got {listeners!r}"
        raise ValueError(msg)
    shared = listeners > 1
    if shared and port != 0:
        _check_free(host, port)  # SO_REUSEPORT would otherwise join a listener of the same user
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", int(shared)),
        ("grpc.max_metadata_size", limits.max_header_bytes),
        ("grpc.absolute_max_metadata_size", limits.max_header_bytes),
        ("grpc.max_connection_idle_ms", int(limits.grpc_idle_s * 1000)),
        ("grpc.max_concurrent_streams", limits.grpc_max_concurrent_streams),
        ("grpc.keepalive_time_ms", _KEEPALIVE_MS),
        ("grpc.keepalive_timeout_ms", _KEEPALIVE_TIMEOUT_MS),
    ]
    servicer = _Servicer(repository, metrics, control if control is not None else RepositoryControl())
    servicer.typed_limit = limits.max_json_bytes
    if request_log is not None:
        servicer.pipeline.log = request_log
    handler = servicer.handler()
    servers = []
    for _ in range(listeners):
        server = grpc.aio.server(options=options)
        server.add_generic_rpc_handlers((handler,))
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        port = server.add_insecure_port(address)  # port 0 picks one; the other listeners join it
        servers.append(server)
    return GrpcServer(servers, servicer), port


def _check_free(host: str, port: int) -> None:
    """``RuntimeError`` when something listens on ``host:port`` (as grpc raises when it cannot bind)."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        for family, kind, proto, _, address in addresses:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no obstacle
                probe.bind(address)
    except OSError as error:
        msg = f"Failed to bind to address {host}:{port}: {error}"
        raise RuntimeError(msg) from None


class _Malformed:
    """A request message that did not parse; the handler answers INVALID_ARGUMENT."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _parser(message: Any) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return message.FromString(data)
        except Exception as error:  # noqa: BLE001 (protobuf's DecodeError, or worse, on client bytes)
            return _Malformed(error)

    return parse


class _Servicer:
    """The RPC handlers over one repository."""

    def __init__(self, repository: Repository, metrics: Any, control: RepositoryControl) -> None:
        self._repository = repository
        self._control = control
        self.pipeline = Pipeline(repository, "grpc", metrics)
        self._controller = Controller(repository, control)
        self.draining = False
        self.last_call = 0.0  # loop time of the latest ModelInfer, for the drain's quiet window
        self.typed_limit = ConnectionLimits().max_json_bytes  # bytes of typed contents per request

    def handler(self) -> Any:
        """The generic handler that routes the service's methods to this object."""
        methods = {
            "ServerLive": (self.server_live, pb.ServerLiveRequest, pb.ServerLiveResponse),
            "ServerReady": (self.server_ready, pb.ServerReadyRequest, pb.ServerReadyResponse),
            "ModelReady": (self.model_ready, pb.ModelReadyRequest, pb.ModelReadyResponse),
            "ServerMetadata": (self.server_metadata, pb.ServerMetadataRequest, pb.ServerMetadataResponse),
            "ModelMetadata": (self.model_metadata, pb.ModelMetadataRequest, pb.ModelMetadataResponse),
            "ModelInfer": (self.model_infer, pb.ModelInferRequest, pb.ModelInferResponse),
            "ModelConfig": (self.model_config, pb.ModelConfigRequest, pb.ModelConfigResponse),
            "ModelStatistics": (self.model_statistics, pb.ModelStatisticsRequest, pb.ModelStatisticsResponse),
            "RepositoryIndex": (self.repository_index, pb.RepositoryIndexRequest, pb.RepositoryIndexResponse),
            "RepositoryModelLoad": (self.model_load, pb.RepositoryModelLoadRequest, pb.RepositoryModelLoadResponse),
            "RepositoryModelUnload": (
                self.model_unload,
                pb.RepositoryModelUnloadRequest,
                pb.RepositoryModelUnloadResponse,
            ),
        }
        return grpc.method_handlers_generic_handler(
            pb.SERVICE,
            {
                name: grpc.unary_unary_rpc_method_handler(
                    behavior,
                    # ModelInfer parses in model_infer: a large message off the event loop
                    request_deserializer=None if name == "ModelInfer" else _parser(request),
                    response_serializer=response.SerializeToString,
                )
                for name, (behavior, request, response) in methods.items()
            },
        )

    # -- health and metadata ---------------------------------------------------------------

    async def server_live(self, request: Any, context: Any) -> Any:
        """The server answers, so it is live."""
        await _check_parsed(request, context)
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, request: Any, context: Any) -> Any:
        """Ready when every model is."""
        await _check_parsed(request, context)
        return pb.ServerReadyResponse(ready=self._repository.ready())

    async def model_ready(self, request: Any, context: Any) -> Any:
        """Whether one model (or version) is ready; NOT_FOUND for an unknown one."""
        await _check_parsed(request, context)
        try:
            return pb.ModelReadyResponse(ready=self._repository.ready(request.name, request.version or None))
        except InferkitError as error:
            await _abort(context, grpc_code(error), str(error))

    async def server_metadata(self, request: Any, context: Any) -> Any:
        """The server's name, version and the protocol extensions served over gRPC."""
        await _check_parsed(request, context)
        served = extensions("grpc", repository_control=self._control.enabled)
        return pb.ServerMetadataResponse(name="inferkit", version=server_version(), extensions=served)

    async def model_metadata(self, request: Any, context: Any) -> Any:
        """A model's versions, platform and tensors (none for an untyped callable)."""
        await _check_parsed(request, context)
        try:
            meta = self._repository.metadata(request.name, request.version or None)
        except InferkitError as error:
            await _abort(context, grpc_code(error), str(error))
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta["name"],
            versions=meta["versions"],
            platform=meta["platform"],
            inputs=[tensor(**t) for t in meta["inputs"]],
            outputs=[tensor(**t) for t in meta["outputs"]],
        )

    async def model_config(self, request: Any, context: Any) -> Any:
        """A model's Triton-shaped configuration (as REST's ``/config``)."""
        await _check_parsed(request, context)
        try:
            config = self._repository.config(request.name, request.version or None)
        except InferkitError as error:
            await _abort(context, grpc_code(error), str(error))
        return pb.ModelConfigResponse(config=json_format.ParseDict(config, pb.ModelConfig()))

    async def model_statistics(self, request: Any, context: Any) -> Any:
        """Triton-shaped statistics of one model (or version), or of every model (as REST's ``/stats``)."""
        await _check_parsed(request, context)
        try:
            stats = self._repository.stats(request.name or None, request.version or None)
        except InferkitError as error:
            await _abort(context, grpc_code(error), str(error))
        return json_format.ParseDict(stats, pb.ModelStatisticsResponse())

    # -- model repository ------------------------------------------------------------------

    async def repository_index(self, request: Any, context: Any) -> Any:
        """Every model the server knows, with its state (only the ready ones when asked)."""
        await _check_parsed(request, context)
        await _one_repository(request, context)
        entries = [e for e in self._repository.index() if not request.ready or e["state"] == "READY"]
        return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(**e) for e in entries])

    async def model_load(self, request: Any, context: Any) -> Any:
        """Load (or hot-swap) a model; needs the operator's token."""
        await self._authorize(request, context)
        try:
            params = {key: _parameter(value) for key, value in request.parameters.items()}
            await self._controller.load(request.model_name, load_parameters(params))
        except InferkitError as error:
            await _abort(context, grpc_code(error), str(error))
        return pb.RepositoryModelLoadResponse()

    async def model_unload(self, request: Any, context: Any) -> Any:
        """Unload a model once what it accepted is answered; needs the operator's token."""
        await self._authorize(request, context)
        try:
            await self._controller.unload(request.model_name)
        except InferkitError as error:
            await _abort(context, grpc_code(error), str(error))
        return pb.RepositoryModelUnloadResponse()

    async def _authorize(self, request: Any, context: Any) -> None:
        await _check_parsed(request, context)
        header = next((str(v) for k, v in context.invocation_metadata() or () if k == "authorization"), None)
        try:
            self._control.authorize(header)
        except InferkitError as error:
            await _abort(context, grpc_code(error), str(error))
        await _one_repository(request, context)

    # -- inference -------------------------------------------------------------------------

    async def model_infer(self, data: bytes, context: Any) -> Any:
        """Parse, then decode, run through the pipeline (batched with every other caller), encode."""
        start = self.pipeline.begin(context.invocation_metadata)
        large = len(data) >= _OFFLOAD_BYTES  # parsed and decoded off the loop, so others are not held up
        request: Any
        if len(data) > self.typed_limit and not _has_raw_contents(data):
            request = _Malformed(_typed_too_large(len(data), self.typed_limit))  # refused before parsing it
        else:
            parse = _parser(pb.ModelInferRequest)
            request = await asyncio.to_thread(parse, data) if large else parse(data)
        if self.draining:
            self.last_call = asyncio.get_running_loop().time()
            model = request.model_name if not isinstance(request, _Malformed) else ""
            self.pipeline.record(start, model, None, None, Closed.__name__)
            await _abort(context, grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry on another")
        if isinstance(request, _Malformed):
            self.pipeline.record(start, "", None, None, InvalidInput.__name__)
            await _check_parsed(request, context)
        try:
            response, arm = await self.pipeline.run(
                start,
                request.model_name,
                request.model_version or None,
                functools.partial(_call, request, context, large=large),
                _answer,
            )
        except Failed as failed:
            if failed.arm is not None:
                context.set_trailing_metadata(((ARM_METADATA, failed.arm),))
            error = failed.error
            code = grpc_code(error) if isinstance(error, InferkitError) else grpc.StatusCode.INTERNAL
            await _abort(context, code, describe(error))
        if arm is not None:
            context.set_trailing_metadata(((ARM_METADATA, arm),))
        return response


async def _call(request: Any, context: Any, *, large: bool) -> Call:
    """The pipeline's view of a parsed ModelInferRequest (its tensors decoded off the loop when ``large``)."""
    inputs = await asyncio.to_thread(_decode_inputs, request) if large else _decode_inputs(request)
    requested = _requested_outputs(request)
    key, timeout, priority = _options(request, context)
    return Call(inputs, requested, key, timeout, priority, request)


async def _answer(call: Call, result: InferResult) -> tuple[Any, str | None]:
    """The ModelInferResponse for ``result`` (encoded off the loop when large) and the arm that served it."""
    if sum(np.asarray(o).nbytes for o in result.outputs.values()) >= _OFFLOAD_BYTES:
        response = await asyncio.to_thread(_encode_response, call.request, result.outputs, call.outputs)
    else:
        response = _encode_response(call.request, result.outputs, call.outputs)
    if result.arm is not None:
        response.parameters["arm"].string_param = result.arm
    return response, result.arm


async def _one_repository(request: Any, context: Any) -> None:
    if request.repository_name:
        await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "'repository_name' specification is not supported")


async def _check_parsed(request: Any, context: Any) -> None:
    if isinstance(request, _Malformed):
        error = request.error
        detail = str(error) if isinstance(error, InvalidInput) else f"the request message does not parse: {error}"
        await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, detail)


async def _abort(context: Any, code: Any, details: str) -> NoReturn:
    await context.abort(code, details)
    msg = "grpc.aio's context.abort returned instead of raising"
    raise AssertionError(msg)  # unreachable: abort ends the RPC by raising


# -- request options -------------------------------------------------------------------------


def _parameter(parameter: Any) -> bool | int | str | float | None:
    which = parameter.WhichOneof("parameter_choice")
    return None if which is None else getattr(parameter, which)


def _options(request: Any, context: Any) -> tuple[Hashable | None, float | None, int]:
    """The sticky key, the deadline in seconds and the priority of a ModelInfer request."""
    params = request.parameters
    plain = {}
    if params:
        refuse_unsupported(params, "the request's parameters")
        plain = {name: _parameter(params[name]) for name in _OPTION_PARAMETERS if name in params}
    header = next((str(v) for k, v in context.invocation_metadata() or () if k == KEY_METADATA), None)
    timeout, priority, key = request_options(plain, key=header, remaining_s=context.time_remaining())
    return key, timeout, priority


def _requested_outputs(request: Any) -> list[str]:
    names: dict[str, None] = {}  # ordered, and a repeat found in O(1)
    for output in request.outputs:
        if output.parameters:
            refuse_unsupported(output.parameters, f"output {output.name!r}")
        if output.name in names:
            msg = f"output {output.name!r:.200} is requested twice"
            raise InvalidInput(msg)
        names[output.name] = None
    return list(names)


# -- tensors ---------------------------------------------------------------------------------


_RAW_INPUT_CONTENTS = 7  # ModelInferRequest's field number


def _has_raw_contents(data: bytes) -> bool:
    """Whether a serialized ModelInferRequest has ``raw_input_contents``, read from its top-level tags only.

    Typed ``contents`` become a Python object per value (~30x their bytes, like JSON over REST),
    and even parsing them costs that much: a large message without raw contents is refused
    before it is parsed. Reads a handful of tags and lengths; a message it cannot walk is left
    to the parser (True).
    """
    view, i = memoryview(data), 0
    try:
        while i < len(view):
            tag, i = _varint(view, i)
            field, kind = tag >> 3, tag & 7
            if field == _RAW_INPUT_CONTENTS:
                return True
            if kind == 0:
                _, i = _varint(view, i)
            elif kind == 2:
                length, i = _varint(view, i)
                i += length
            else:
                i += {1: 8, 5: 4}[kind]
    except (IndexError, KeyError):
        return True
    return False


def _varint(view: memoryview, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = view[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise IndexError


def _typed_too_large(size: int, limit: int) -> InvalidInput:
    return InvalidInput(
        f"a {size}-byte request with typed contents, more than max_json_bytes={limit}; "
        "send the tensors in raw_input_contents (as tritonclient does)"
    )


def _decode_inputs(request: Any) -> dict[str, Array]:
    """The input arrays of a ModelInferRequest by name; ``InvalidInput`` naming the bad one."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        msg = f"the request has {len(request.inputs)} inputs but {len(raw)} raw_input_contents; send one per input"
        raise InvalidInput(msg)
    arrays: dict[str, Array] = {}
    for i, tensor in enumerate(request.inputs):
        name = tensor.name
        if name in arrays:
            msg = f"input {name!r} appears twice"
            raise InvalidInput(msg, input_name=name)
        arrays[name] = _decode(tensor, raw[i] if raw else None, request.model_name)
    return arrays


def _decode(tensor: Any, raw: bytes | None, model: str) -> Array:
    name, datatype = tensor.name, tensor.datatype
    if tensor.parameters:
        refuse_unsupported(tensor.parameters, f"input {name!r}", name)
    try:
        dtype = dtype_of(datatype)
    except InvalidInput as error:
        raise invalid(str(error), name) from None
    shape = tuple(tensor.shape)
    count = element_count(shape, name)
    if raw is not None:
        if tensor.HasField("contents"):
            msg = (
                f"contents field must not be specified when using raw_input_contents for {name!r:.200} "
                f"for model {model!r:.200}; send one or the other"
            )
            raise InvalidInput(msg, input_name=name)
        flat = from_raw(raw, datatype, count, name)
    else:
        flat = _from_contents(name, datatype, dtype, count, tensor.contents)
    return shaped(flat, shape, name)


def _from_contents(name: str, datatype: str, dtype: np.dtype[Any], count: int, contents: Any) -> Array:
    field = _CONTENTS.get(datatype)
    if field is None:
        raise invalid(f"{datatype} data must come in raw_input_contents", name)
    for descriptor, _ in contents.ListFields():
        if descriptor.name != field:
            raise invalid(f"{datatype} data goes in {field}, got {descriptor.name}", name)
    values = getattr(contents, field)
    if len(values) != count:
        raise invalid(f"has {len(values)} values in {field}, but shape needs {count}", name)
    if dtype.kind == "O":
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array
    wide = np.fromiter(values, dtype=_WIDE[field], count=count)  # no list of Python numbers in between
    return wide if wide.dtype == dtype else fit(wide, datatype, name)


def _encode_response(request: Any, outputs: dict[str, Array], requested: Sequence[str]) -> Any:
    """A ModelInferResponse with ``outputs`` (only ``requested`` ones, in order, when given)."""
    if requested:
        check_outputs(requested, outputs, request.model_name)
    response = pb.ModelInferResponse(model_name=request.model_name, model_version=request.model_version, id=request.id)
    for name in requested or outputs:
        array = np.asarray(outputs[name])
        datatype = datatype_of(array.dtype)
        response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        response.raw_output_contents.append(to_raw(array))
    return response
