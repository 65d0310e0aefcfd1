"""The RPC handlers of Triton's ``inference.GRPCInferenceService`` over one repository (:mod:`inferkit.server.grpc`)."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import grpc
from google.protobuf import json_format

from inferkit.errors import Closed, DecodingBusy, InferkitError, InvalidInput, RequestTooLarge
from inferkit.server import proto as pb
from inferkit.server.budget import GRPC_ADVICE, TYPED_COST_PER_BYTE, TYPED_FIELD_COST, Budget, Hold
from inferkit.server.control import Controller, load_parameters
from inferkit.server.grpc_messages import (
    BUDGETED_BYTES,
    OFFLOAD_BYTES,
    Malformed,
    answer,
    call,
    parameter,
    parser,
    too_many_fields,
    typed_part,
    typed_too_large,
)
from inferkit.server.limits import ConnectionLimits
from inferkit.server.pipeline import Pipeline, describe
from inferkit.server.protocol import ARM, extensions, grpc_code, server_version
from inferkit.server.repository import Failed, Repository

__all__ = ["Servicer"]


SWEEP_S = 1.0  # how often calls still receiving their request message are checked against the limit


class Servicer:
    """The RPC handlers over one repository."""

    def __init__(self, repository: Repository, metrics: Any, controller: Controller, limits: ConnectionLimits) -> None:
        self._repository = repository
        self._control = controller.control
        self.pipeline = Pipeline(repository, "grpc", metrics)
        self._controller = controller
        self.draining = False
        self.last_call = 0.0  # loop time of the latest ModelInfer, for the drain's quiet window
        self._reads = _Reads(limits.grpc_message_timeout_s)  # from the call's start to its whole request message
        self.typed_limit = limits.max_json_bytes  # bytes of typed contents (all but raw contents) per request
        self._budget = Budget(limits.max_decode_bytes, GRPC_ADVICE)  # typed parts parsed, BYTES elements decoded
        self._answer = functools.partial(answer, budget=self._budget)

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
        # Unary on the wire, but read here: grpc.aio waits for a unary call's message before any
        # handler runs, with no time limit, so a client that sends part of one held its stream.
        return grpc.method_handlers_generic_handler(
            pb.SERVICE,
            {
                name: grpc.stream_unary_rpc_method_handler(
                    self._reads.one_message(behavior),
                    # ModelInfer parses in model_infer: a large message off the event loop
                    request_deserializer=None if name == "ModelInfer" else parser(request),
                    response_serializer=response.SerializeToString,
                )
                for name, (behavior, request, response) in methods.items()
            },
        )

    # -- health and metadata ---------------------------------------------------------------

    async def server_live(self, request: Any, context: Any) -> Any:
        """The server answers, so it is live."""
        await check_parsed(request, context)
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, request: Any, context: Any) -> Any:
        """Ready when every model is."""
        await check_parsed(request, context)
        return pb.ServerReadyResponse(ready=self._repository.ready())

    async def model_ready(self, request: Any, context: Any) -> Any:
        """Whether one model (or version) is ready; NOT_FOUND for an unknown one."""
        await check_parsed(request, context)
        try:
            return pb.ModelReadyResponse(ready=self._repository.ready(request.name, request.version or None))
        except InferkitError as error:
            await abort(context, grpc_code(error), str(error))

    async def server_metadata(self, request: Any, context: Any) -> Any:
        """The server's name, version and the protocol extensions served over gRPC."""
        await check_parsed(request, context)
        served = extensions("grpc", repository_control=self._control.enabled)
        return pb.ServerMetadataResponse(name="inferkit", version=server_version(), extensions=served)

    async def model_metadata(self, request: Any, context: Any) -> Any:
        """A model's versions, platform and tensors (none for an untyped callable)."""
        await check_parsed(request, context)
        try:
            meta = self._repository.metadata(request.name, request.version or None)
        except InferkitError as error:
            await abort(context, grpc_code(error), str(error))
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
        await check_parsed(request, context)
        try:
            config = self._repository.config(request.name, request.version or None)
        except InferkitError as error:
            await abort(context, grpc_code(error), str(error))
        return pb.ModelConfigResponse(config=json_format.ParseDict(config, pb.ModelConfig()))

    async def model_statistics(self, request: Any, context: Any) -> Any:
        """Triton-shaped statistics of one model (or version), or of every model (as REST's ``/stats``)."""
        await check_parsed(request, context)
        try:
            stats = self._repository.stats(request.name or None, request.version or None)
        except InferkitError as error:
            await abort(context, grpc_code(error), str(error))
        return json_format.ParseDict(stats, pb.ModelStatisticsResponse())

    # -- model repository ------------------------------------------------------------------

    async def repository_index(self, request: Any, context: Any) -> Any:
        """Every model the server knows, with its state (only the ready ones when asked)."""
        await check_parsed(request, context)
        await one_repository(request, context)
        entries = [e for e in self._repository.index() if not request.ready or e["state"] == "READY"]
        return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(**e) for e in entries])

    async def model_load(self, request: Any, context: Any) -> Any:
        """Load (or hot-swap) a model; needs the operator's token."""
        await self._authorize(request, context)
        try:
            params = {key: parameter(value) for key, value in request.parameters.items()}
            await self._controller.load(request.model_name, load_parameters(params))
        except InferkitError as error:
            await abort(context, grpc_code(error), str(error))
        return pb.RepositoryModelLoadResponse()

    async def model_unload(self, request: Any, context: Any) -> Any:
        """Unload a model once what it accepted is answered; needs the operator's token."""
        await self._authorize(request, context)
        try:
            await self._controller.unload(request.model_name)
        except InferkitError as error:
            await abort(context, grpc_code(error), str(error))
        return pb.RepositoryModelUnloadResponse()

    async def _authorize(self, request: Any, context: Any) -> None:
        await check_parsed(request, context)
        header = next((str(v) for k, v in context.invocation_metadata() or () if k == "authorization"), None)
        try:
            self._control.authorize(header)
        except InferkitError as error:
            await abort(context, grpc_code(error), str(error))
        await one_repository(request, context)

    # -- inference -------------------------------------------------------------------------

    async def model_infer(self, data: bytes, context: Any) -> Any:
        """Parse, then decode, run through the pipeline (batched with every other caller), encode."""
        start = self.pipeline.begin(context.invocation_metadata)
        large = len(data) >= OFFLOAD_BYTES  # parsed and decoded off the loop, so others are not held up
        parsed = Hold(self._budget, "parsing this request's typed contents")
        try:
            return await self._infer(start, data, large, parsed, context)
        finally:  # given back once decoded; here when the request failed before
            parsed.release()

    async def _infer(self, start: float, data: bytes, large: bool, parsed: Hold, context: Any) -> Any:
        request: Any
        refused: InferkitError | None = None
        try:
            request = await self._parse(data, large, parsed)
        except (RequestTooLarge, DecodingBusy) as busy:  # the budget's answer, before the message was parsed
            request, refused = Malformed(busy), busy
        if self.draining:
            self.last_call = asyncio.get_running_loop().time()
            model = request.model_name if not isinstance(request, Malformed) else ""
            self.pipeline.record(start, model, None, None, Closed.__name__)
            await abort(context, grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry on another")
        if refused is not None:
            self.pipeline.record(start, "", None, None, type(refused).__name__)
            await abort(context, grpc_code(refused), str(refused))
        if isinstance(request, Malformed):
            self.pipeline.record(start, "", None, None, InvalidInput.__name__)
            await check_parsed(request, context)
        name, version = request.model_name, request.model_version or None
        # decoding takes the message from the box: nothing holds it (~12-14x its typed bytes) while the model runs
        decode = functools.partial(call, [request], context, large=large, hold=parsed)
        del request
        try:
            response, arm = await self.pipeline.run(start, name, version, decode, self._answer)
        except Failed as failed:
            if failed.arm is not None:
                context.set_trailing_metadata(((ARM, failed.arm),))
            error = failed.error
            code = grpc_code(error) if isinstance(error, InferkitError) else grpc.StatusCode.INTERNAL
            await abort(context, code, describe(error))
        if arm is not None:
            context.set_trailing_metadata(((ARM, arm),))
        return response

    async def _parse(self, data: bytes, large: bool, parsed: Hold) -> Any:
        """The request, or :class:`Malformed` (refused unparsed when its typed part is over ``max_json_bytes``).

        A typed part of ``BUDGETED_BYTES`` and more reserves its memory in ``parsed`` first
        (``RequestTooLarge``, ``DecodingBusy``): the parse builds objects from every field of it.
        """
        if len(data) > self.typed_limit or len(data) >= BUDGETED_BYTES:  # else small enough whatever it holds
            part = await typed_part(data, self.typed_limit)
            if part.too_many:
                return Malformed(too_many_fields())
            if part.nbytes > self.typed_limit:
                return Malformed(typed_too_large(self.typed_limit))
            if part.nbytes >= BUDGETED_BYTES:
                parsed.take(part.nbytes * TYPED_COST_PER_BYTE + part.fields * TYPED_FIELD_COST)
        parse = parser(pb.ModelInferRequest)
        return await parsed.offload(parse, data) if large else parse(data)


class _Reads:
    """Calls still receiving their request message, each ended ``DEADLINE_EXCEEDED`` once it is ``timeout`` late.

    One sweep a second for them all (while any call reads), not a timer per call: a timer per
    call measured 0.95x ModelInfer's rate of the server without one, the sweep 1.0x. A late
    call ends within a second past ``timeout``.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.limit = f"the request message did not arrive within grpc_message_timeout_s={timeout} s"
        self._reading: dict[asyncio.Task[Any], float] = {}  # call's task: loop time it must have its message by
        self._late: set[asyncio.Task[Any]] = set()
        self._sweep: asyncio.TimerHandle | None = None

    def one_message(self, behavior: Callable[[Any, Any], Awaitable[Any]]) -> Callable[[Any, Any], Any]:
        """A stream-unary handler that answers ``behavior`` with the call's one request message."""

        async def handle(_: Any, context: Any) -> Any:
            request = await self._read(context)
            if request is grpc.aio.EOF:  # half-closed without a message: what grpc says for a unary call
                await abort(context, grpc.StatusCode.INTERNAL, "the call sent no request message")
            return await behavior(request, context)

        return handle

    async def _read(self, context: Any) -> Any:
        task = asyncio.current_task()
        assert task is not None  # grpc.aio runs each call in a task
        loop = asyncio.get_running_loop()
        self._reading[task] = loop.time() + self.timeout
        if self._sweep is None:
            self._sweep = loop.call_later(SWEEP_S, self._ended_late, loop)
        try:
            return await context.read()
        except asyncio.CancelledError:
            if task not in self._late:
                raise
            self._late.discard(task)
            task.uncancel()
            await abort(context, grpc.StatusCode.DEADLINE_EXCEEDED, self.limit)
        finally:
            self._reading.pop(task, None)

    def _ended_late(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        for task, by in list(self._reading.items()):
            if by <= now:
                del self._reading[task]
                self._late.add(task)
                task.cancel()
        self._sweep = loop.call_later(SWEEP_S, self._ended_late, loop) if self._reading else None


async def one_repository(request: Any, context: Any) -> None:
    if request.repository_name:
        await abort(context, grpc.StatusCode.INVALID_ARGUMENT, "'repository_name' specification is not supported")


async def check_parsed(request: Any, context: Any) -> None:
    if isinstance(request, Malformed):
        error = request.error
        detail = str(error) if isinstance(error, InvalidInput) else f"the request message does not parse: {error}"
        await abort(context, grpc.StatusCode.INVALID_ARGUMENT, detail)


async def abort(context: Any, code: Any, details: str) -> NoReturn:
    await context.abort(code, details)
    msg = "grpc.aio's context.abort returned instead of raising"
    raise AssertionError(msg)  # unreachable: abort ends the RPC by raising
