"""The gRPC face end to end: a real grpc.aio server on a free port, tritonclient and raw gRPC calls."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import queue
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any, Self

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from fakes import BLOCK, POISON, Model, rows
from google.protobuf import descriptor_pb2
from tritonclient.grpc import model_config_pb2
from tritonclient.grpc import service_pb2 as triton_pb2
from tritonclient.utils import InferenceServerException

from inferkit import ABTest, BatchConfig, DeadlineExceeded, Fixed, Predictor, Router, TensorSpec
from inferkit.server import Repository, ServedModel
from inferkit.server import proto as pb
from inferkit.server.grpc import ARM_METADATA, KEY_METADATA, create_server
from inferkit.server.limits import ConnectionLimits
from inferkit.server.protocol import DTYPES, datatype_of, dtype_of, pack_bytes, unpack_bytes

WAIT = 30  # seconds: a bound on every wait, never expected to be reached
CODE = grpc.StatusCode
MAX_MESSAGE = 64 * 2**20
CHANNEL_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)]
MESSAGES = [
    "ServerLiveRequest",
    "ServerLiveResponse",
    "ServerReadyRequest",
    "ServerReadyResponse",
    "ModelReadyRequest",
    "ModelReadyResponse",
    "ServerMetadataRequest",
    "ServerMetadataResponse",
    "ModelMetadataRequest",
    "ModelMetadataResponse",
    "InferParameter",
    "InferTensorContents",
    "ModelInferRequest",
    "ModelInferResponse",
    "ModelConfigRequest",
    "ModelConfigResponse",
    "ModelStatisticsRequest",
    "ModelStatisticsResponse",
    "StatisticDuration",
    "InferStatistics",
    "InferBatchStatistics",
    "MemoryUsage",
    "ModelStatistics",
    "ModelRepositoryParameter",
    "RepositoryIndexRequest",
    "RepositoryIndexResponse",
    "RepositoryModelLoadRequest",
    "RepositoryModelLoadResponse",
    "RepositoryModelUnloadRequest",
    "RepositoryModelUnloadResponse",
]
CONFIG_MESSAGES = [  # from Triton's model_config.proto: only the fields inferkit fills
    "ModelConfig",
    "ModelInput",
    "ModelOutput",
    "ModelDynamicBatching",
    "ModelQueuePolicy",
    "ModelInstanceGroup",
    "ModelParameter",
]


# -- a server in a thread of its own -----------------------------------------------------------


class Metrics:
    """Records every ``observe`` call the server makes."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: list[tuple[str, str | None, str, float]] = []

    def observe(self, model: str, arm: str | None, outcome: str, seconds: float) -> None:
        with self.lock:
            self.seen.append((model, arm, outcome, seconds))

    def outcomes(self) -> list[tuple[str, str | None, str]]:
        with self.lock:
            return [(model, arm, outcome) for model, arm, outcome, _ in self.seen]


class Served:
    """``create_server`` running on its own event loop in a background thread, with two clients."""

    def __init__(self, repository: Repository, **options: Any) -> None:
        self.repository = repository
        self.metrics = Metrics()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(options,), name="test-grpc-server", daemon=True)
        self._thread.start()
        assert self._ready.wait(WAIT)
        if self._error is not None:
            raise self._error
        self.url = f"127.0.0.1:{self.port}"
        self.channel = grpc.insecure_channel(self.url, options=CHANNEL_OPTIONS)
        self.triton = triton.InferenceServerClient(self.url)

    def _run(self, options: dict[str, Any]) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._main(options))
        finally:
            loop.close()

    async def _main(self, options: dict[str, Any]) -> None:
        try:
            self.server, self.port = create_server(self.repository, port=0, metrics=self.metrics, **options)
            await self.server.start()
        except BaseException as error:
            self._error = error
            self._ready.set()
            return
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._ready.set()
        await self._stop.wait()
        await self.server.stop(None)

    def call(self, method: str, request: Any, **kwargs: Any) -> Any:
        """Call ``method`` with a message (or raw bytes); ``kwargs`` go to the stub (timeout, metadata)."""
        return self.stub(method)(request, **kwargs)

    def stub(self, method: str) -> Any:
        response = getattr(pb, f"{method}Response")
        return self.channel.unary_unary(
            f"/{pb.SERVICE}/{method}",
            request_serializer=lambda m: m if isinstance(m, bytes) else m.SerializeToString(),
            response_deserializer=response.FromString,
        )

    def close(self) -> None:
        self.triton.close()
        self.channel.close()
        if self._error is None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(WAIT)
        assert not self._thread.is_alive()


@pytest.fixture(name="serve")
def _serve() -> Iterator[Callable[..., Served]]:
    """Start servers for a test; stop them and close their models after it."""
    started: list[Served] = []
    repositories: list[Repository] = []

    def start(models: Any, **options: Any) -> Served:
        repository = models if isinstance(models, Repository) else Repository(models)
        repositories.append(repository)
        served = Served(repository, **options)
        started.append(served)
        return served

    yield start
    for served in started:
        served.close()
    for repository in repositories:
        repository.close(WAIT)


# -- models and requests -----------------------------------------------------------------------


def scaled(factor: float, **kw: Any) -> Predictor:
    """``y = factor * x`` over float32 rows of 4."""
    return Predictor.from_callable(
        lambda x: x * np.float32(factor),
        inputs=[TensorSpec("x", np.float32, (None, 4))],
        outputs=[TensorSpec("y", np.float32, (None, 4))],
        **kw,
    )


def mixed() -> Predictor:
    """INT64 and BYTES in, three outputs: ``twice`` (INT64), ``upper`` (BYTES), ``length`` (INT32)."""

    def fn(d: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        upper = np.empty(len(d["s"]), dtype=object)
        upper[:] = [v.upper() for v in d["s"]]
        return {"twice": d["i"] * 2, "upper": upper, "length": np.array([len(v) for v in d["s"]], dtype=np.int32)}

    return Predictor.from_callable(
        fn,
        inputs=[TensorSpec("i", np.int64, (None,)), TensorSpec("s", object, (None,))],
        outputs=[
            TensorSpec("twice", np.int64, (None,)),
            TensorSpec("upper", object, (None,)),
            TensorSpec("length", np.int32, (None,)),
        ],
    )


def echo() -> Predictor:
    """An untyped callable that returns its inputs under their own names (one input: as ``output``)."""
    return Predictor.from_callable(lambda x: x if isinstance(x, np.ndarray) else dict(x))


def gated(**batching: Any) -> tuple[Predictor, Model]:
    """``y = 2 x`` over float64 rows of 3, one replica, one row a batch; BLOCK rows wait for release."""
    model = Model()
    predictor = Predictor.from_callable(
        model,
        inputs=[TensorSpec("x", np.float64, (None, 3))],
        outputs=[TensorSpec("y", np.float64, (None, 3))],
        batching=BatchConfig(max_batch_size=1, **batching),
    )
    return predictor, model


class Tap:
    """A predictor seen through a window: every future it hands out also goes to ``futures``."""

    def __init__(self, inner: Predictor) -> None:
        self.inner = inner
        self.signature = inner.signature
        self.futures: queue.Queue[Future[Any]] = queue.Queue()

    @property
    def ready(self) -> bool:
        return self.inner.ready

    def predict(self, x: Any, *, timeout: float | None = None, priority: int = 0) -> Any:
        return self.inner.predict(x, timeout=timeout, priority=priority)

    def submit(self, x: Any, *, timeout: float | None = None, priority: int = 0) -> Future[Any]:
        future = self.inner.submit(x, timeout=timeout, priority=priority)
        self.futures.put(future)
        return future

    def stats(self) -> Any:
        return self.inner.stats()

    def close(self, timeout: float | None = None) -> None:
        self.inner.close(timeout)

    def next_settled(self) -> Future[Any]:
        """The next future submitted, once it is done."""
        future = self.futures.get(timeout=WAIT)
        done = threading.Event()
        future.add_done_callback(lambda _: done.set())
        assert done.wait(WAIT)
        return future


def infer_request(model: str, inputs: dict[str, np.ndarray], version: str = "", **fields: Any) -> Any:
    """A ModelInferRequest with each input's data in raw_input_contents."""
    request = pb.ModelInferRequest(model_name=model, model_version=version, **fields)
    for name, array in inputs.items():
        datatype = datatype_of(array.dtype)
        request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        request.raw_input_contents.append(pack_bytes(array) if datatype == "BYTES" else array.tobytes())
    return request


def typed_fp32(model: str, count: int) -> Any:
    """A ModelInferRequest of one input ``a`` of ``[1, count]`` halves in fp32_contents."""
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="a", datatype="FP32", shape=[1, count]).contents.fp32_contents.extend([0.5] * count)
    return request


@contextlib.contextmanager
def only_worker_thread_held(served: Served) -> Iterator[None]:
    """The server's default executor cut to one thread, held for the block: work sent to a thread waits."""
    loop, gate, started = served._loop, threading.Event(), threading.Event()
    loop.call_soon_threadsafe(loop.set_default_executor, ThreadPoolExecutor(1))

    def blocker() -> None:
        started.set()
        assert gate.wait(WAIT)

    blocked = asyncio.run_coroutine_threadsafe(asyncio.to_thread(blocker), loop)
    try:
        assert started.wait(WAIT)
        yield
    finally:
        gate.set()
        blocked.result(WAIT)


def outputs_of(response: Any) -> dict[str, np.ndarray]:
    """A ModelInferResponse's outputs, decoded from raw_output_contents."""
    assert len(response.raw_output_contents) == len(response.outputs)
    decoded = {}
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        count = int(np.prod(tensor.shape))
        if tensor.datatype == "BYTES":
            flat = unpack_bytes(raw, count, tensor.name)
        else:
            flat = np.frombuffer(raw, dtype=dtype_of(tensor.datatype))
        decoded[tensor.name] = flat.reshape(tuple(tensor.shape))
    return decoded


def triton_input(name: str, array: np.ndarray) -> triton.InferInput:
    tensor = triton.InferInput(name, list(array.shape), datatype_of(array.dtype))
    tensor.set_data_from_numpy(array)
    return tensor


def status(error: InferenceServerException) -> CODE:
    """The gRPC status code a tritonclient error carries."""
    return {str(code): code for code in CODE}[error.status()]


X = np.arange(8, dtype=np.float32).reshape(2, 4)


def good(served: Served, model: str = "m") -> None:
    """The server still answers a valid request correctly."""
    response = served.call("ModelInfer", infer_request(model, {"x": X}))
    np.testing.assert_array_equal(outputs_of(response)["y"], X * 2)


class StalledCalls:
    """A raw HTTP/2 connection whose gRPC calls each send 5 bytes of a 1 MB request message, then stall.

    It answers SETTINGS and keep-alive PINGs, as a live client does, and records the trailers
    that end each call (``ended`` once all have) and when the connection closes (``closed``).
    """

    def __init__(self, port: int, methods: list[str]) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        self.trailers: dict[int, bytes] = {}
        self.reset: set[int] = set()
        self.ended, self.closed = threading.Event(), threading.Event()
        self._streams = {1 + 2 * i for i in range(len(methods))}
        out = [b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", self._frame(4, 0, 0, b"")]
        for stream, method in zip(sorted(self._streams), methods, strict=True):
            fields = {":method": "POST", ":scheme": "http", ":path": f"/{pb.SERVICE}/{method}", ":authority": "x"}
            fields |= {"content-type": "application/grpc", "te": "trailers"}
            # HPACK literals without indexing, no Huffman: 0, name length, name, value length, value
            block = b"".join(bytes([0, len(k)]) + k.encode() + bytes([len(v)]) + v.encode() for k, v in fields.items())
            out.append(self._frame(1, 0x4, stream, block))  # END_HEADERS
            out.append(self._frame(0, 0, stream, b"\x00" + (10**6).to_bytes(4, "big") + b"\x00" * 5))
        self.sock.sendall(b"".join(out))
        self._reader = threading.Thread(target=self._read, name="test-stalled-calls", daemon=True)
        self._reader.start()

    @staticmethod
    def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
        return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload

    def _exactly(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = self.sock.recv(count - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def _read(self) -> None:
        with contextlib.suppress(EOFError, OSError):
            while True:
                head = self._exactly(9)
                kind, flags, stream = head[3], head[4], int.from_bytes(head[5:], "big") & 0x7FFFFFFF
                payload = self._exactly(int.from_bytes(head[:3], "big"))
                if kind == 1 and flags & 0x1:  # HEADERS with END_STREAM: the call's status
                    self.trailers[stream] = payload
                elif kind == 3:  # RST_STREAM
                    self.reset.add(stream)
                elif kind == 4 and not flags & 0x1:  # SETTINGS: acknowledge
                    self.sock.sendall(self._frame(4, 0x1, 0, b""))
                elif kind == 6 and not flags & 0x1:  # PING: answer, as a live client does
                    self.sock.sendall(self._frame(6, 0x1, 0, payload))
                if self._streams <= self.trailers.keys():
                    self.ended.set()
        self.closed.set()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()
        self._reader.join(WAIT)


# -- tests -------------------------------------------------------------------------------------


class TestHealth:
    """Liveness, readiness and metadata, through tritonclient."""

    def test_live_and_ready(self, serve: Callable[..., Served]) -> None:
        """The server is live and ready, and so is its model; an unknown model is NOT_FOUND."""
        served = serve({"m": scaled(2)})
        assert served.triton.is_server_live()
        assert served.triton.is_server_ready()
        assert served.triton.is_model_ready("m")
        with pytest.raises(InferenceServerException) as info:
            served.triton.is_model_ready("nope")
        assert status(info.value) == CODE.NOT_FOUND

    def test_server_metadata(self, serve: Callable[..., Served]) -> None:
        """The server names itself and its version."""
        served = serve({"m": scaled(2)})
        meta = served.triton.get_server_metadata(as_json=True)
        assert meta["name"] == "inferkit"
        assert meta["version"]

    def test_model_metadata(self, serve: Callable[..., Served]) -> None:
        """Model metadata lists versions, platform and the tensors with -1 for dynamic dims."""
        served = serve([ServedModel("m", scaled(2), versions={"1": scaled(3)})])
        meta = served.triton.get_model_metadata("m", as_json=True)
        assert meta["name"] == "m"
        assert meta["versions"] == ["1"]
        assert meta["platform"] == "inferkit"
        assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1", "4"]}]
        assert meta["outputs"] == [{"name": "y", "datatype": "FP32", "shape": ["-1", "4"]}]
        assert served.triton.get_model_metadata("m", "1").name == "m"
        for name, version in (("nope", ""), ("m", "7")):
            with pytest.raises(InferenceServerException) as info:
                served.triton.get_model_metadata(name, version)
            assert status(info.value) == CODE.NOT_FOUND


class TestInfer:
    """ModelInfer with tritonclient's defaults and with raw messages."""

    def test_model_config_of_settings_past_tritons_fields(self, serve: Callable[..., Served]) -> None:
        """A Predictor built in Python may queue more than a uint32 and batch more than an int32: ModelConfig
        failed (UNKNOWN, a ParseError logged); it shows them held to the fields' ranges."""
        batching = BatchConfig(max_queue_size=2**40, max_batch_size=2**33, max_delay_ms=1e17)
        served = serve({"big": Predictor.from_callable(lambda a: a, batching=batching)})
        config = served.call("ModelConfig", pb.ModelConfigRequest(name="big"), timeout=WAIT).config
        assert config.max_batch_size == 2**31 - 1
        assert config.dynamic_batching.default_queue_policy.max_queue_size == 2**32 - 1
        assert config.dynamic_batching.max_queue_delay_microseconds == 2**64 - 1

    def test_fp32_onnx(self, serve: Callable[..., Served], mlp_model: bytes, mlp_weights: Any) -> None:
        """FP32 through an ONNX model equals ``x @ W + b``; the request id is echoed."""
        weight, bias = mlp_weights
        served = serve({"mlp": Predictor.from_onnx(mlp_model)})
        x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
        result = served.triton.infer("mlp", [triton_input("x", x)], request_id="req-1")
        np.testing.assert_allclose(result.as_numpy("y"), x @ weight + bias, rtol=1e-5)
        assert result.get_response().id == "req-1"
        assert result.get_output("y").datatype == "FP32"

    def test_int64_and_bytes(self, serve: Callable[..., Served]) -> None:
        """INT64 and BYTES tensors go in and come out, with every output by default."""
        served = serve({"mixed": mixed()})
        i = np.array([1, -2, 2**40], dtype=np.int64)
        s = np.array([b"ab", b"", b"\x00xyz"], dtype=object)
        result = served.triton.infer("mixed", [triton_input("i", i), triton_input("s", s)])
        np.testing.assert_array_equal(result.as_numpy("twice"), i * 2)
        assert list(result.as_numpy("upper")) == [b"AB", b"", b"\x00XYZ"]
        np.testing.assert_array_equal(result.as_numpy("length"), [2, 0, 4])
        assert [o.name for o in result.get_response().outputs] == ["twice", "upper", "length"]

    def test_requested_outputs_in_order(self, serve: Callable[..., Served], two_outputs_model: bytes) -> None:
        """Only the requested outputs come back, in the order asked, each in raw_output_contents."""
        served = serve({"two": Predictor.from_onnx(two_outputs_model)})
        x = np.arange(12, dtype=np.float32).reshape(3, 4)
        outputs = [triton.InferRequestedOutput("s"), triton.InferRequestedOutput("y")]
        result = served.triton.infer("two", [triton_input("x", x)], outputs=outputs)
        response = result.get_response()
        assert [o.name for o in response.outputs] == ["s", "y"]
        assert len(response.raw_output_contents) == 2
        np.testing.assert_allclose(result.as_numpy("s"), x.sum(axis=1))
        np.testing.assert_allclose(result.as_numpy("y"), x * 2)
        only = served.triton.infer("two", [triton_input("x", x)], outputs=[triton.InferRequestedOutput("y")])
        assert [o.name for o in only.get_response().outputs] == ["y"]

    def test_sixteen_megabytes(self, serve: Callable[..., Served]) -> None:
        """A 16 MiB tensor passes both ways with tritonclient's default settings."""
        width = 2**20
        predictor = Predictor.from_callable(
            lambda x: x + np.float32(1),
            inputs=[TensorSpec("x", np.float32, (None, width))],
            outputs=[TensorSpec("y", np.float32, (None, width))],
        )
        served = serve({"big": predictor})
        x = np.random.default_rng(1).standard_normal((4, width)).astype(np.float32)
        assert x.nbytes == 16 * 2**20
        result = served.triton.infer("big", [triton_input("x", x)])
        np.testing.assert_array_equal(result.as_numpy("y"), x + 1)

    def test_message_limit(self, serve: Callable[..., Served]) -> None:
        """A request over ``max_message_bytes`` is refused with RESOURCE_EXHAUSTED; smaller ones pass."""
        served = serve({"m": scaled(2)}, max_message_bytes=2**16)
        big = np.zeros((2**13, 4), dtype=np.float32)  # 128 KiB
        with pytest.raises(grpc.RpcError) as info:
            served.call("ModelInfer", infer_request("m", {"x": big}))
        assert info.value.code() == CODE.RESOURCE_EXHAUSTED
        good(served)

    @pytest.mark.parametrize(
        ("datatype", "field", "values"),
        [
            ("BOOL", "bool_contents", [True, False, True, True]),
            ("INT8", "int_contents", [-128, 0, 5, 127]),
            ("INT16", "int_contents", [-300, 0, 5, 32767]),
            ("INT32", "int_contents", [-(2**31), 0, 5, 2**31 - 1]),
            ("INT64", "int64_contents", [-(2**63), 0, 5, 2**63 - 1]),
            ("UINT8", "uint_contents", [0, 1, 128, 255]),
            ("UINT16", "uint_contents", [0, 1, 128, 65535]),
            ("UINT32", "uint_contents", [0, 1, 128, 2**32 - 1]),
            ("UINT64", "uint64_contents", [0, 1, 128, 2**64 - 1]),
            ("FP32", "fp32_contents", [0.5, -1.25, 3.0, 1e30]),
            ("FP64", "fp64_contents", [0.5, -1.25, 3.0, 1e300]),
        ],
    )
    def test_typed_contents(self, serve: Callable[..., Served], datatype: str, field: str, values: list[Any]) -> None:
        """Typed ``contents`` decode to the datatype's dtype and come back raw, equal."""
        served = serve({"echo": echo()})
        request = pb.ModelInferRequest(model_name="echo")
        tensor = request.inputs.add(name="a", datatype=datatype, shape=[2, 2])
        getattr(tensor.contents, field).extend(values)
        (out,) = outputs_of(served.call("ModelInfer", request)).values()  # one output, named "output"
        assert out.dtype == dtype_of(datatype)
        np.testing.assert_array_equal(out, np.array(values, dtype=dtype_of(datatype)).reshape(2, 2))

    def test_typed_fp32_contents_keep_their_bits(self, serve: Callable[..., Served]) -> None:
        """fp32_contents were read as Python floats: x86 widening a signalling NaN to a double quiets it, so
        0x7FA00001 came back 0x7FE00001 where raw_input_contents (and Triton, which copies the field) keep it.
        The values are taken from the field's bytes; sent unpacked, with an unknown field, bits kept too."""
        served = serve({"echo": echo()})
        bits = np.array([0x7FA00001, 0xFFA00002, 0x3F800000, 0x00000001], dtype="<u4")  # sNaNs, 1.0, a subnormal
        packed = bytes([6 << 3 | 2, 16]) + bits.tobytes()
        unpacked = b"".join(bytes([6 << 3 | 5]) + bits[i : i + 1].tobytes() for i in range(4))
        for wire in (packed, unpacked, bytes([15 << 3, 5]) + packed):
            request = pb.ModelInferRequest(model_name="echo")
            request.inputs.add(name="a", datatype="FP32", shape=[2, 2]).contents.ParseFromString(wire)
            (out,) = outputs_of(served.call("ModelInfer", request)).values()
            assert out.dtype == np.float32
            assert out.ravel().view("<u4").tolist() == bits.tolist(), [hex(b) for b in out.ravel().view("<u4")]

    def test_typed_bytes_contents(self, serve: Callable[..., Served]) -> None:
        """BYTES in ``bytes_contents`` reach the model as bytes objects."""
        served = serve({"mixed": mixed()})
        request = pb.ModelInferRequest(model_name="mixed")
        request.inputs.add(name="i", datatype="INT64", shape=[2]).contents.int64_contents.extend([3, 4])
        request.inputs.add(name="s", datatype="BYTES", shape=[2]).contents.bytes_contents.extend([b"q", b"rs"])
        out = outputs_of(served.call("ModelInfer", request))
        assert list(out["upper"]) == [b"Q", b"RS"]
        np.testing.assert_array_equal(out["twice"], [6, 8])

    def test_timeout_and_priority_parameters(self, serve: Callable[..., Served]) -> None:
        """tritonclient's ``timeout`` (microseconds) and ``priority`` are accepted on a request that runs in time."""
        served = serve({"m": scaled(2)})
        result = served.triton.infer("m", [triton_input("x", X)], timeout=10_000_000, priority=3)
        np.testing.assert_array_equal(result.as_numpy("y"), X * 2)


class TestRouting:
    """Routers behind the server: sticky keys, the served arm, pinned versions."""

    def _served(self, serve: Callable[..., Served]) -> Served:
        a, b = scaled(2), scaled(3)
        router = Router({"a": a, "b": b}, ABTest({"a": 1, "b": 1}), seed=0)
        return serve([ServedModel("m", router, versions={"1": a, "2": b})])

    def test_metadata_key_is_sticky_and_arm_is_reported(self, serve: Callable[..., Served]) -> None:
        """The ``inferkit-key`` metadata picks the arm; the response parameter ``arm`` names it."""
        served = self._served(serve)
        factor = {"a": 2, "b": 3}
        arms = {}
        for user in range(16):
            for _ in range(2):
                headers = {KEY_METADATA: f"user-{user}"}
                result = served.triton.infer("m", [triton_input("x", X)], headers=headers)
                arm = result.get_response().parameters["arm"].string_param
                assert arms.setdefault(user, arm) == arm
                np.testing.assert_array_equal(result.as_numpy("y"), X * factor[arm])
        assert set(arms.values()) == {"a", "b"}
        assert all(arm in {"a", "b"} for _, arm, _ in served.metrics.outcomes())

    def test_versions_of_other_outputs_answer_under_their_own_names(self, serve: Callable[..., Served]) -> None:
        """A one-output result was named from the unpinned router's signature, its first arm's: with version 1
        declaring ``z`` and version 2 (which answers unpinned requests) ``y``, every answer came back as ``z``
        (tritonclient's as_numpy("y") gave None), and the metadata listed version 1's outputs. Now each answer
        is named as the arm that gave it declares; the metadata shows the highest version, as the config does."""
        one = Predictor.from_callable(
            lambda x: x * np.float32(5),
            inputs=[TensorSpec("x", np.float32, (None, 4))],
            outputs=[TensorSpec("z", np.float32, (None, 4))],
        )
        two = scaled(3)
        served = serve([ServedModel("m", Router({"1": one, "2": two}, Fixed("2")), versions={"1": one, "2": two})])
        np.testing.assert_array_equal(served.triton.infer("m", [triton_input("x", X)]).as_numpy("y"), X * 3)
        pinned = served.triton.infer("m", [triton_input("x", X)], model_version="1")
        np.testing.assert_array_equal(pinned.as_numpy("z"), X * 5)
        assert [o.name for o in served.triton.get_model_metadata("m").outputs] == ["y"]
        assert [o.name for o in served.triton.get_model_metadata("m", "1").outputs] == ["z"]

    def test_parameter_key_matches_metadata_key(self, serve: Callable[..., Served]) -> None:
        """The request parameter ``key`` (a string, or an int read as its string) routes like the metadata key."""
        served = self._served(serve)
        for user in range(8):
            by_header = served.triton.infer("m", [triton_input("x", X)], headers={KEY_METADATA: str(user)})
            arm = by_header.get_response().parameters["arm"].string_param
            for key in (str(user), user):
                by_param = served.triton.infer("m", [triton_input("x", X)], parameters={"key": key})
                assert by_param.get_response().parameters["arm"].string_param == arm

    def test_trailing_metadata_names_the_arm(self, serve: Callable[..., Served]) -> None:
        """The served arm also travels as the trailing metadata ``inferkit-arm``."""
        served = self._served(serve)
        response, call = served.stub("ModelInfer").with_call(
            infer_request("m", {"x": X}), metadata=[(KEY_METADATA, "someone")]
        )
        arm = response.parameters["arm"].string_param
        assert (ARM_METADATA, arm) in tuple(call.trailing_metadata())
        assert served.metrics.outcomes() == [("m", arm, "success")]

    def test_version_pins(self, serve: Callable[..., Served]) -> None:
        """``model_version`` pins that version (no arm reported); an unknown version is NOT_FOUND."""
        served = self._served(serve)
        for version, factor in (("1", 2), ("2", 3)):
            result = served.triton.infer("m", [triton_input("x", X)], model_version=version)
            np.testing.assert_array_equal(result.as_numpy("y"), X * factor)
            assert "arm" not in result.get_response().parameters
            assert result.get_response().model_version == version
        with pytest.raises(InferenceServerException) as info:
            served.triton.infer("m", [triton_input("x", X)], model_version="3")
        assert status(info.value) == CODE.NOT_FOUND


def _request_with(edit: Callable[[Any], None]) -> Any:
    request = infer_request("m", {"x": X})
    edit(request)
    return request


def _set(**fields: Any) -> Callable[[Any], None]:
    def edit(request: Any) -> None:
        for name, value in fields.items():
            setattr(request, name, value)

    return edit


def _tensor(**fields: Any) -> Callable[[Any], None]:
    def edit(request: Any) -> None:
        for name, value in fields.items():
            if name == "shape":
                request.inputs[0].shape[:] = value
            else:
                setattr(request.inputs[0], name, value)

    return edit


def _raw(*contents: bytes) -> Callable[[Any], None]:
    def edit(request: Any) -> None:
        request.raw_input_contents[:] = list(contents)

    return edit


def _second_input(request: Any) -> None:
    request.inputs.add(name="z", datatype="FP32", shape=[2, 4])


def _typed_too(request: Any) -> None:
    request.inputs[0].contents.fp32_contents.extend(X.ravel().tolist())


def _typed(field: str, values: list[Any], datatype: str = "FP32") -> Callable[[Any], None]:
    def edit(request: Any) -> None:
        del request.raw_input_contents[:]
        request.inputs[0].datatype = datatype
        getattr(request.inputs[0].contents, field).extend(values)

    return edit


def _duplicate(request: Any) -> None:
    request.inputs.add().CopyFrom(request.inputs[0])
    request.raw_input_contents.append(request.raw_input_contents[0])


def _param(name: str, kind: str, value: Any) -> Callable[[Any], None]:
    def edit(request: Any) -> None:
        setattr(request.parameters[name], kind, value)

    return edit


def _output(name: str, **params: Any) -> Callable[[Any], None]:
    def edit(request: Any) -> None:
        output = request.outputs.add(name=name)
        for key, value in params.items():
            output.parameters[key].int64_param = value

    return edit


MALFORMED = {
    "wrong shape": (_tensor(shape=[4, 2]), CODE.INVALID_ARGUMENT, "'x'"),
    "negative dimension": (_tensor(shape=[-2, -4]), CODE.INVALID_ARGUMENT, "'x'"),
    "70 dimensions": (_tensor(shape=[1] * 69 + [2 * 4]), CODE.INVALID_ARGUMENT, "maximum supported dimension"),
    "unknown datatype": (_tensor(datatype="FP33"), CODE.INVALID_ARGUMENT, "'x'"),
    "lower-case datatype": (_tensor(datatype="fp32"), CODE.INVALID_ARGUMENT, "'x'"),
    "wrong datatype for the model": (_tensor(datatype="INT32"), CODE.INVALID_ARGUMENT, "'x'"),
    "raw size too small": (_raw(X.tobytes()[:-1]), CODE.INVALID_ARGUMENT, "'x'"),
    "raw size too large": (_raw(X.tobytes() + b"\0" * 4), CODE.INVALID_ARGUMENT, "'x'"),
    "too few raw contents": (_second_input, CODE.INVALID_ARGUMENT, "raw_input_contents"),
    "too many raw contents": (_raw(X.tobytes(), X.tobytes()), CODE.INVALID_ARGUMENT, "raw_input_contents"),
    "raw and typed contents": (
        _typed_too,
        CODE.INVALID_ARGUMENT,
        "contents field must not be specified when using raw_input_contents for 'x' for model 'm'",
    ),
    "no data": (_raw(), CODE.INVALID_ARGUMENT, "'x'"),
    "typed count mismatch": (_typed("fp32_contents", [1.0] * 7), CODE.INVALID_ARGUMENT, "'x'"),
    "typed field for another datatype": (_typed("fp64_contents", [1.0] * 8), CODE.INVALID_ARGUMENT, "'x'"),
    "typed FP16": (_typed("fp32_contents", [1.0] * 8, "FP16"), CODE.INVALID_ARGUMENT, "'x'"),
    # cast, it lost values (1e-50 became 0.0): refused as Triton does
    "typed FP64 for an FP32 model": (
        _typed("fp64_contents", [1e-50] * 8, "FP64"),
        CODE.INVALID_ARGUMENT,
        "input 'x' data-type is 'FP64', but model 'm' expects 'FP32'",
    ),
    "raw FP64 for an FP32 model": (
        lambda r: (_tensor(datatype="FP64")(r), _raw(X.astype(np.float64).tobytes())(r)),
        CODE.INVALID_ARGUMENT,
        "input 'x' data-type is 'FP64', but model 'm' expects 'FP32'",
    ),
    "typed value out of range": (_typed("int_contents", [300] * 8, "INT8"), CODE.INVALID_ARGUMENT, "'x'"),
    "duplicate input": (_duplicate, CODE.INVALID_ARGUMENT, "'x'"),
    "no inputs": (lambda r: (r.ClearField("inputs"), r.ClearField("raw_input_contents")), CODE.INVALID_ARGUMENT, "x"),
    "unknown input": (_tensor(name="q"), CODE.INVALID_ARGUMENT, "'q'"),
    "unknown model": (_set(model_name="nope"), CODE.NOT_FOUND, "Request for unknown model: 'nope' is not found"),
    "unknown version": (
        _set(model_version="9"),
        CODE.NOT_FOUND,
        "Request for unknown model: 'm' version 9 is not found",
    ),
    "unknown version string": (
        _set(model_version="v9"),
        CODE.NOT_FOUND,
        "failed to get model version from specified version string 'v9'",
    ),
    "unknown output": (_output("zz"), CODE.INVALID_ARGUMENT, "unexpected inference output 'zz' for model 'm'"),
    "output twice": (lambda r: (_output("y")(r), _output("y")(r)), CODE.INVALID_ARGUMENT, "'y'"),
    "classification": (_output("y", classification=3), CODE.INVALID_ARGUMENT, "classification"),
    "negative timeout": (_param("timeout", "int64_param", -1), CODE.INVALID_ARGUMENT, "timeout"),
    "string priority": (_param("priority", "string_param", "high"), CODE.INVALID_ARGUMENT, "priority"),
    "double key": (_param("key", "double_param", 0.5), CODE.INVALID_ARGUMENT, "key"),
    "sequence": (_param("sequence_id", "int64_param", 7), CODE.INVALID_ARGUMENT, "sequence"),
}


class TestErrors:
    """Every failure answers with its status code, and the server keeps answering."""

    @pytest.mark.parametrize("case", list(MALFORMED))
    def test_malformed_request(self, serve: Callable[..., Served], case: str) -> None:
        """A malformed request gets INVALID_ARGUMENT or NOT_FOUND with a clear message; the next one succeeds."""
        edit, code, mentions = MALFORMED[case]
        served = serve({"m": scaled(2)})
        with pytest.raises(grpc.RpcError) as info:
            served.call("ModelInfer", _request_with(edit))
        assert info.value.code() == code, info.value.details()
        assert mentions in info.value.details()
        good(served)
        outcome = "ModelNotFound" if code == CODE.NOT_FOUND else "InvalidInput"
        assert served.metrics.outcomes()[0][2] == outcome

    def test_unparseable_message(self, serve: Callable[..., Served]) -> None:
        """Bytes that are not a message are INVALID_ARGUMENT, for every method."""
        served = serve({"m": scaled(2)})
        for method in ("ModelInfer", "ModelMetadata", "ModelReady", "ServerLive"):
            with pytest.raises(grpc.RpcError) as info:
                served.call(method, b"\xff\xff\xff\xff")
            assert info.value.code() == CODE.INVALID_ARGUMENT
        good(served)

    def test_unimplemented_method(self, serve: Callable[..., Served]) -> None:
        """Triton methods outside the subset are UNIMPLEMENTED."""
        served = serve({"m": scaled(2)})
        with pytest.raises(InferenceServerException) as info:
            served.triton.get_trace_settings()
        assert status(info.value) == CODE.UNIMPLEMENTED

    def test_model_failure_is_internal(self, serve: Callable[..., Served]) -> None:
        """A model that raises answers INTERNAL, and its neighbours still succeed."""
        predictor, _ = gated()
        served = serve({"g": predictor})
        with pytest.raises(InferenceServerException) as info:
            served.triton.infer("g", [triton_input("x", rows(POISON))])
        assert status(info.value) == CODE.INTERNAL
        assert "poisoned row" in info.value.message()
        result = served.triton.infer("g", [triton_input("x", rows(4.0))])
        np.testing.assert_array_equal(result.as_numpy("y"), rows(4.0) * 2)
        assert [o for _, _, o in served.metrics.outcomes()] == ["ModelError", "success"]

    @pytest.mark.parametrize("limit", ["max_queue_size", "max_queue_bytes"])
    def test_a_full_queue_is_unavailable(self, serve: Callable[..., Served], limit: str) -> None:
        """A full queue (one request, or one row's bytes, waiting) answers UNAVAILABLE at once; a
        request holding more than ``max_queue_bytes`` alone is INVALID_ARGUMENT; neither runs."""
        predictor, model = gated(**{limit: 1 if limit == "max_queue_size" else rows(1.0).nbytes})
        served = serve({"g": predictor})
        try:
            blocker = predictor.submit(rows(BLOCK))
            assert model.entered.wait(WAIT)
            queued = predictor.submit(rows(5.0))
            with pytest.raises(InferenceServerException) as info:
                served.triton.infer("g", [triton_input("x", rows(6.0))])
            assert status(info.value) == CODE.UNAVAILABLE
            assert limit in info.value.message()
            if limit == "max_queue_bytes":
                with pytest.raises(InferenceServerException) as info:
                    served.triton.infer("g", [triton_input("x", rows(7.0, n=2))])
                assert status(info.value) == CODE.INVALID_ARGUMENT
        finally:
            model.release.set()
        blocker.result(WAIT)
        queued.result(WAIT)
        assert not {6.0, 7.0} & set(model.seen().tolist())

    def test_grpc_deadline(self, serve: Callable[..., Served]) -> None:
        """A gRPC deadline that passes while the request is queued is DEADLINE_EXCEEDED; it never runs."""
        predictor, model = gated()
        tap = Tap(predictor)
        served = serve({"g": tap})
        try:
            blocker = predictor.submit(rows(BLOCK))
            assert model.entered.wait(WAIT)
            with pytest.raises(InferenceServerException) as info:
                served.triton.infer("g", [triton_input("x", rows(7.0))], client_timeout=0.3)
            assert status(info.value) == CODE.DEADLINE_EXCEEDED
            settled = tap.next_settled()
            assert settled.cancelled() or isinstance(settled.exception(), DeadlineExceeded)
        finally:
            model.release.set()
        blocker.result(WAIT)
        assert 7.0 not in model.seen()

    def test_timeout_parameter(self, serve: Callable[..., Served]) -> None:
        """tritonclient's ``timeout`` (microseconds) becomes the deadline: DEADLINE_EXCEEDED while queued."""
        predictor, model = gated()
        served = serve({"g": predictor})
        try:
            blocker = predictor.submit(rows(BLOCK))
            assert model.entered.wait(WAIT)
            start = time.monotonic()
            with pytest.raises(InferenceServerException) as info:
                served.triton.infer("g", [triton_input("x", rows(8.0))], timeout=200_000)
            assert status(info.value) == CODE.DEADLINE_EXCEEDED
            assert time.monotonic() - start >= 0.2
        finally:
            model.release.set()
        blocker.result(WAIT)
        assert 8.0 not in model.seen()
        assert served.metrics.outcomes() == [("g", None, "DeadlineExceeded")]

    def test_client_cancel_cancels_the_queued_request(self, serve: Callable[..., Served]) -> None:
        """A client that cancels has its queued request cancelled: it never runs."""
        predictor, model = gated()
        tap = Tap(predictor)
        served = serve({"g": tap})
        try:
            blocker = predictor.submit(rows(BLOCK))
            assert model.entered.wait(WAIT)
            call = served.stub("ModelInfer").future(infer_request("g", {"x": rows(9.0)}))
            submitted = tap.futures.get(timeout=WAIT)
            tap.futures.put(submitted)
            assert call.cancel()
            assert tap.next_settled().cancelled()
        finally:
            model.release.set()
        blocker.result(WAIT)
        assert 9.0 not in model.seen()
        assert predictor.stats().cancelled == 1


class TestFuzz:
    """Seeded random mutations of valid requests never look like a server fault."""

    def test_mutated_requests(self, serve: Callable[..., Served]) -> None:
        """10,000 mutated ModelInferRequests get OK or a client-error code, never INTERNAL/UNKNOWN."""
        served = serve({"fuzz": _fuzz_model(), "m": scaled(2)})
        rng = random.Random(20240611)
        stub = served.stub("ModelInfer")
        allowed = {CODE.OK, CODE.INVALID_ARGUMENT, CODE.NOT_FOUND, CODE.DEADLINE_EXCEEDED, CODE.UNAVAILABLE}
        seen: dict[CODE, int] = {}
        window: list[tuple[Any, Any]] = []

        def drain(keep: int) -> None:
            while len(window) > keep:
                request, call = window.pop(0)
                code = call.code()
                seen[code] = seen.get(code, 0) + 1
                assert code in allowed, (code, call.details(), request)

        for _ in range(10_000):
            request = _mutate(rng)
            window.append((request, stub.future(request, timeout=WAIT)))
            drain(64)
        drain(0)
        assert seen[CODE.OK] > 100
        assert seen[CODE.INVALID_ARGUMENT] > 1000
        good(served)
        response = served.call("ModelInfer", _fuzz_base())
        out = outputs_of(response)
        np.testing.assert_array_equal(out["y"], X * 2)
        np.testing.assert_array_equal(out["n"], [2, 0])


def _fuzz_model() -> Predictor:
    def fn(d: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"y": d["x"] * np.float32(2), "n": np.array([len(v) for v in d["s"]], dtype=np.int64)}

    return Predictor.from_callable(
        fn,
        inputs=[TensorSpec("x", np.float32, (None, 4)), TensorSpec("s", object, (None,))],
        outputs=[TensorSpec("y", np.float32, (None, 4)), TensorSpec("n", np.int64, (None,))],
    )


def _fuzz_base() -> Any:
    return infer_request("fuzz", {"x": X, "s": np.array([b"ab", b""], dtype=object)})


_DIMS = [-(2**63), -1, 0, 1, 2, 3, 4, 8, 2**31, 2**62, 2**63 - 1]
_NAMES = ["", "x", "s", "y", "n", "zz", "x ", "é"]
_PARAMS = ["key", "timeout", "priority", "sequence_id", "binary_data_output", "zz", ""]


def _random_parameter(parameter: Any, rng: random.Random) -> None:
    kind = rng.choice(["bool_param", "int64_param", "string_param", "double_param", "uint64_param"])
    value = {
        "bool_param": rng.random() < 0.5,
        "int64_param": rng.choice([-(2**63), -1, 0, 1, 1000, 2**63 - 1, rng.randrange(-(2**63), 2**63)]),
        "string_param": rng.choice(["", "a", "key-1", "\x00", "é" * 10]),
        "double_param": rng.choice([0.0, -1.5, 1e300, float("inf"), float("nan")]),
        "uint64_param": rng.choice([0, 1, 2**64 - 1, rng.randrange(2**64)]),
    }[kind]
    setattr(parameter, kind, value)


def _mutation(request: Any, rng: random.Random) -> None:
    inputs = request.inputs
    tensor = inputs[rng.randrange(len(inputs))] if inputs else None
    raw = request.raw_input_contents
    which = rng.randrange(16)
    if which == 0:
        request.model_name = rng.choice(["", "nope", "m", "Fuzz", "fuzz ", "x" * 300])
    elif which == 1:
        request.model_version = rng.choice(["", "1", "zz"])
    elif which == 2 and tensor is not None:
        tensor.datatype = rng.choice([*DTYPES, "", "fp32", "FP33", "STRING", "\x00"])
    elif which == 3 and tensor is not None:
        tensor.shape[:] = [rng.choice(_DIMS) for _ in range(rng.randrange(6))]
    elif which == 4 and tensor is not None and tensor.shape:
        tensor.shape[rng.randrange(len(tensor.shape))] = rng.choice(_DIMS)
    elif which == 5 and raw:
        i = rng.randrange(len(raw))
        raw[i] = raw[i][: rng.randrange(len(raw[i]) + 1)]
    elif which == 6 and raw:
        i = rng.randrange(len(raw))
        raw[i] = raw[i] + rng.randbytes(rng.randrange(1, 9))
    elif which == 7 and raw:
        raw[rng.randrange(len(raw))] = rng.randbytes(rng.randrange(40))
    elif which == 8:
        if raw and rng.random() < 0.5:
            del raw[rng.randrange(len(raw))]
        else:
            raw.append(rng.randbytes(rng.randrange(40)))
    elif which == 9 and tensor is not None:
        if rng.random() < 0.5:
            del raw[:]
        field = rng.choice(["bool_contents", "int_contents", "int64_contents", "fp32_contents", "bytes_contents"])
        n = rng.randrange(10)
        values = {
            "bool_contents": [True] * n,
            "int_contents": [rng.randrange(-(2**31), 2**31) for _ in range(n)],
            "int64_contents": [rng.randrange(-(2**63), 2**63) for _ in range(n)],
            "fp32_contents": [rng.uniform(-1e3, 1e3) for _ in range(n)],
            "bytes_contents": [rng.randbytes(rng.randrange(4)) for _ in range(n)],
        }[field]
        getattr(tensor.contents, field).extend(values)
    elif which == 10 and tensor is not None:
        tensor.name = rng.choice(_NAMES)
    elif which == 11 and tensor is not None:
        if rng.random() < 0.5:
            inputs.add().CopyFrom(tensor)
        else:
            inputs.remove(tensor)
    elif which == 12:
        _random_parameter(request.parameters[rng.choice(_PARAMS)], rng)
    elif which == 13 and tensor is not None:
        _random_parameter(tensor.parameters[rng.choice(["shared_memory_region", "binary_data_size", "zz"])], rng)
    elif which == 14:
        output = request.outputs.add(name=rng.choice(_NAMES))
        if rng.random() < 0.3:
            _random_parameter(output.parameters[rng.choice(["classification", "binary_data", "zz"])], rng)
    else:
        request.id = rng.choice(["", "id-1", "é" * 20])


def _mutate(rng: random.Random) -> Any:
    """A valid request with one to three random field mutations, or (one in ten) its bytes damaged."""
    request = _fuzz_base()
    for _ in range(rng.randint(1, 3)):
        _mutation(request, rng)
    if rng.random() < 0.1:
        data = bytearray(request.SerializeToString())
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data[: rng.randrange(len(data) + 1)] if rng.random() < 0.3 else data)
    return request


class TestWire:
    """Our messages are Triton's on the wire, and the committed descriptor is the .proto's."""

    @pytest.mark.parametrize("name", MESSAGES)
    def test_fields_match_tritonclient(self, name: str) -> None:
        """Every field (nested ones too) has Triton's name, number, type, label, type name and oneof."""
        ours = pb.POOL.FindMessageTypeByName(f"inference.{name}")
        theirs = triton_pb2.DESCRIPTOR.message_types_by_name[name]
        assert _fields(_proto(ours)) == _fields(_proto(theirs))
        assert _proto(ours) == _proto(theirs)

    @pytest.mark.parametrize("name", CONFIG_MESSAGES)
    def test_config_fields_are_a_subset_of_tritonclient(self, name: str) -> None:
        """Each model-config field we declare is Triton's field, with the same number, type and oneof."""
        ours = _fields(_proto(pb.POOL.FindMessageTypeByName(f"inference.{name}")))
        theirs = set(_fields(_proto(model_config_pb2.DESCRIPTOR.message_types_by_name[name])))
        assert ours
        assert [f for f in ours if f not in theirs] == []

    def test_enums_match_tritonclient(self) -> None:
        """DataType and the nested enums have Triton's names and numbers."""
        ours = pb.POOL.FindEnumTypeByName("inference.DataType")
        theirs = model_config_pb2.DESCRIPTOR.enum_types_by_name["DataType"]
        assert [(v.name, v.number) for v in ours.values] == [(v.name, v.number) for v in theirs.values]
        for message, enum in [("ModelInstanceGroup", "Kind"), ("ModelQueuePolicy", "TimeoutAction")]:
            mine = pb.POOL.FindMessageTypeByName(f"inference.{message}").enum_types_by_name[enum]
            other = model_config_pb2.DESCRIPTOR.message_types_by_name[message].enum_types_by_name[enum]
            assert [(v.name, v.number) for v in mine.values] == [(v.name, v.number) for v in other.values]

    def test_service_methods_match_tritonclient(self) -> None:
        """Each method of our service is Triton's, with the same request and response types."""
        ours = pb.POOL.FindServiceByName(pb.SERVICE)
        theirs = triton_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
        assert ours.full_name == theirs.full_name
        for method in ours.methods:
            other = theirs.methods_by_name[method.name]
            assert (method.input_type.full_name, method.output_type.full_name) == (
                other.input_type.full_name,
                other.output_type.full_name,
            )
            assert not method.client_streaming
            assert not method.server_streaming
        assert {m.name for m in ours.methods} == set(MESSAGES_BY_METHOD)

    def test_committed_descriptor_is_the_proto(self, tmp_path: Path) -> None:
        """``inference.binpb`` is what protoc makes of ``inference.proto`` now (regenerate if not)."""
        protoc = pytest.importorskip("grpc_tools.protoc")
        folder = resources.files(pb)
        out = tmp_path / "inference.binpb"
        assert protoc.main(["protoc", f"-I{folder}", f"--descriptor_set_out={out}", "inference.proto"]) == 0
        fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
        committed = descriptor_pb2.FileDescriptorSet.FromString(folder.joinpath("inference.binpb").read_bytes())
        assert fresh == committed

    def test_imports_beside_tritonclient_in_either_order(self) -> None:
        """Our messages live in a private pool, so importing them first does not break tritonclient."""
        code = "import inferkit.server.grpc, tritonclient.grpc; tritonclient.grpc.service_pb2.ModelInferRequest()"
        argv = [sys.executable, "-W", "error", "-c", code]
        done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=WAIT)
        assert done.returncode == 0, done.stderr

    def test_round_trip_with_tritonclient_messages(self) -> None:
        """A request built with tritonclient's classes parses as ours, field for field, and back."""
        theirs = triton_pb2.ModelInferRequest(model_name="m", model_version="2", id="r")
        theirs.parameters["priority"].uint64_param = 3
        tensor = theirs.inputs.add(name="x", datatype="FP32", shape=[1, 2])
        tensor.contents.fp32_contents.extend([1.0, 2.0])
        theirs.outputs.add(name="y").parameters["binary_data"].bool_param = True
        theirs.raw_input_contents.append(b"\x01\x02")
        ours = pb.ModelInferRequest.FromString(theirs.SerializeToString())
        assert ours.inputs[0].contents.fp32_contents[:] == [1.0, 2.0]
        assert ours.parameters["priority"].uint64_param == 3
        assert triton_pb2.ModelInferRequest.FromString(ours.SerializeToString()) == theirs


MESSAGES_BY_METHOD = [
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelInfer",
    "ModelConfig",
    "ModelStatistics",
    "RepositoryIndex",
    "RepositoryModelLoad",
    "RepositoryModelUnload",
]


def _proto(message: Any) -> Any:
    """The message's DescriptorProto, without ``json_name`` (newer protoc spells out the default)."""
    proto = descriptor_pb2.DescriptorProto()
    message.CopyToProto(proto)
    stack = [proto]
    while stack:
        item = stack.pop()
        for field in item.field:
            field.ClearField("json_name")
        stack.extend(item.nested_type)
    return proto


def _fields(proto: Any, prefix: str = "") -> list[tuple[Any, ...]]:
    """(message, field, number, type, label, type name, oneof, map entry) for every field, nested ones too."""
    out: list[tuple[Any, ...]] = []
    path = f"{prefix}{proto.name}"
    oneofs = [oneof.name for oneof in proto.oneof_decl]
    for field in proto.field:
        oneof = oneofs[field.oneof_index] if field.HasField("oneof_index") else None
        out.append((path, field.name, field.number, field.type, field.label, field.type_name, oneof))
    out.append((path, "map_entry", proto.options.map_entry))
    for nested in proto.nested_type:
        out.extend(_fields(nested, f"{path}."))
    return out


class TestCreateServer:
    """The factory's own arguments."""

    def test_port_zero_picks_a_free_port(self, serve: Callable[..., Served]) -> None:
        """``port=0`` binds a free port and returns it."""
        served = serve({"m": scaled(2)})
        assert served.port > 0
        good(served)

    def test_listeners_share_the_port(self, serve: Callable[..., Served]) -> None:
        """Three listeners on one port: 24 separate connections (the kernel spreads them over the
        listeners, so all landing on one has odds 3**-24) are each answered correctly."""
        served = serve({"m": scaled(2)}, listeners=3)
        assert len(served.server.servers) == 3
        # A channel of its own subchannel pool is a connection of its own.
        options = [*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
        channels = [grpc.insecure_channel(served.url, options=options) for _ in range(24)]
        try:
            for i, channel in enumerate(channels):
                infer = channel.unary_unary(
                    f"/{pb.SERVICE}/ModelInfer",
                    request_serializer=lambda m: m.SerializeToString(),
                    response_deserializer=pb.ModelInferResponse.FromString,
                )
                x = X + i
                np.testing.assert_array_equal(outputs_of(infer(infer_request("m", {"x": x}), timeout=WAIT))["y"], x * 2)
        finally:
            for channel in channels:
                channel.close()

    @pytest.mark.parametrize("listeners", [1, 2])
    def test_a_port_in_use_is_an_error(self, serve: Callable[..., Served], listeners: int) -> None:
        """A port something else listens on is refused, even another inferkit server's SO_REUSEPORT
        listeners, which a second set of SO_REUSEPORT listeners could otherwise silently join."""
        held = serve({"m": scaled(2)}, listeners=2)
        repository = Repository({"m": scaled(3)})

        async def bind() -> None:  # in a loop, as grpc.aio servers are made
            create_server(repository, port=held.port, listeners=listeners)

        try:
            with pytest.raises(RuntimeError, match="bind"):
                asyncio.run(bind())
        finally:
            repository.close(WAIT)
        good(held)

    @pytest.mark.parametrize(
        ("field", "value"),
        [("max_message_bytes", v) for v in (0, -1, 2**31, 1.5)] + [("listeners", v) for v in (0, -1, 1.5, True)],
    )
    def test_bad_arguments(self, field: str, value: Any) -> None:
        """``max_message_bytes`` outside [1, 2**31 - 1], or ``listeners`` not an int >= 1, fails at
        once, naming the field."""
        repository = Repository({"m": scaled(2)})
        try:
            with pytest.raises(ValueError, match=field):
                create_server(repository, port=0, **{field: value})
        finally:
            repository.close(WAIT)


class TestLimitsAndDrain:
    """Connection limits and the graceful stop."""

    def test_metadata_over_max_header_bytes_is_refused(self, serve: Callable[..., Served]) -> None:
        """A call whose metadata is over max_header_bytes fails; the next normal call is answered."""
        served = serve({"m": scaled(2)}, limits=ConnectionLimits(max_header_bytes=4096))
        with pytest.raises(grpc.RpcError) as info:
            served.call("ModelInfer", infer_request("m", {"x": X}), metadata=(("x-big", "a" * 8192),), timeout=WAIT)
        assert info.value.code() == CODE.RESOURCE_EXHAUSTED, info.value
        good(served)

    def test_bytes_elements_are_held_to_max_decode_bytes_before_they_are_decoded(
        self, serve: Callable[..., Served]
    ) -> None:
        """Each raw BYTES element becomes a Python object (~64 bytes) from about 5 bytes of message: a message
        of more than ``max_decode_bytes`` worth is RESOURCE_EXHAUSTED before any is made, and one within it,
        and one past the elements decoded on the event loop, come back exact."""
        served = serve({"e": echo()}, limits=ConnectionLimits(max_decode_bytes=64 * 1_000))
        words = np.array([b"a", b"", "\u00e9".encode(), b"\x00\xff"] * 500, dtype=object).reshape(1, -1)
        with pytest.raises(grpc.RpcError) as info:
            served.call("ModelInfer", infer_request("e", {"s": words}), timeout=WAIT)
        assert info.value.code() == CODE.RESOURCE_EXHAUSTED, info.value
        assert "max_decode_bytes=64000 (a BYTES element" in str(info.value.details())
        few = words[:, :400]
        np.testing.assert_array_equal(
            outputs_of(served.call("ModelInfer", infer_request("e", {"s": few})))["output"], few
        )
        many = np.tile(words, 10)  # 20,000 elements: decoded and encoded off the event loop
        roomy = serve({"e": echo()})
        np.testing.assert_array_equal(
            outputs_of(roomy.call("ModelInfer", infer_request("e", {"s": many})))["output"], many
        )

    def test_typed_contents_beside_raw_contents_are_held_to_max_json_bytes(self, serve: Callable[..., Served]) -> None:
        """One empty raw entry let typed contents past max_json_bytes be parsed (60M empty strings: 2 GiB) before
        the mix was refused; now all but the raw payloads count, raw entries of none too, before parsing."""
        served = serve({"m": scaled(2)}, limits=ConnectionLimits(max_json_bytes=4096))
        typed = pb.ModelInferRequest(model_name="m")
        typed.inputs.add(name="x", datatype="BYTES", shape=[3000]).contents.bytes_contents.extend([b""] * 3000)
        typed.raw_input_contents.append(b"")
        empty_raw = infer_request("m", {"x": X})
        empty_raw.raw_input_contents.extend([b""] * 3000)
        for request in (typed, empty_raw):
            with pytest.raises(grpc.RpcError) as info:
                served.call("ModelInfer", request, timeout=WAIT)
            assert info.value.code() == CODE.INVALID_ARGUMENT, info.value
            assert "more than max_json_bytes=4096 bytes besides raw_input_contents" in str(info.value.details())
        big = np.ones((2**12, 4), np.float32)  # 64 KiB of raw contents still pass
        np.testing.assert_array_equal(
            outputs_of(served.call("ModelInfer", infer_request("m", {"x": big})))["y"], big * 2
        )

    def test_typed_contents_reserve_max_decode_bytes_before_they_are_parsed(self, serve: Callable[..., Served]) -> None:
        """Typed contents of 32 KiB and more reserve ~32x their bytes, as JSON over REST: past max_decode_bytes
        RESOURCE_EXHAUSTED unparsed; smaller typed contents, and raw ones of any size, are not charged."""
        served = serve({"e": echo()}, limits=ConnectionLimits(max_decode_bytes=2**20))

        with pytest.raises(grpc.RpcError) as info:
            served.call("ModelInfer", typed_fp32("e", 2**14), timeout=WAIT)  # 64 KiB: ~2 MiB
        assert info.value.code() == CODE.RESOURCE_EXHAUSTED, info.value
        assert "max_decode_bytes=1048576" in str(info.value.details())
        assert "raw_input_contents" in str(info.value.details())
        (out,) = outputs_of(served.call("ModelInfer", typed_fp32("e", 2**12), timeout=WAIT)).values()  # 16 KiB
        np.testing.assert_array_equal(out, np.full((1, 2**12), 0.5, np.float32))
        raw = np.full((1, 2**18), 0.5, np.float32)  # 1 MiB
        (out,) = outputs_of(served.call("ModelInfer", infer_request("e", {"a": raw}), timeout=WAIT)).values()
        np.testing.assert_array_equal(out, raw)
        assert ("", None, "RequestTooLarge") in served.metrics.outcomes()

    def test_concurrent_typed_contents_share_max_decode_bytes(self, serve: Callable[..., Served]) -> None:
        """Two large typed requests at once, room for one: the first holds its reservation while it waits for the
        only worker thread, the second is UNAVAILABLE (as REST's 503) unparsed; every hold is given back."""
        served = serve({"e": echo()}, limits=ConnectionLimits(max_decode_bytes=48 * 2**20))
        count = 2**18  # 1 MiB of fp32_contents, parsed on a worker thread: ~32 MiB reserved
        request = typed_fp32("e", count)
        budget = served.server._servicer._budget
        with only_worker_thread_held(served):  # a parse waits for it holding its reservation
            first = served.stub("ModelInfer").future(request, timeout=WAIT)
            deadline = time.monotonic() + WAIT
            while budget.used == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert budget.used >= count * 4 * 32
            with pytest.raises(grpc.RpcError) as info:
                served.call("ModelInfer", request, timeout=WAIT)
            assert info.value.code() == CODE.UNAVAILABLE, info.value
            assert "max_decode_bytes=50331648" in str(info.value.details())
        np.testing.assert_array_equal(next(iter(outputs_of(first.result(WAIT)).values())), np.full((1, count), 0.5))
        assert budget.used == 0
        (out,) = outputs_of(served.call("ModelInfer", request, timeout=WAIT)).values()
        np.testing.assert_array_equal(out, np.full((1, count), 0.5, np.float32))
        assert budget.used == 0
        assert ("", None, "DecodingBusy") in served.metrics.outcomes()

    def test_a_cancelled_request_holds_max_decode_bytes_until_its_parse_ends(
        self, serve: Callable[..., Served]
    ) -> None:
        """The reservation was given back when the client's deadline passed, while the parse it paid for still
        waited for (then ran on) a worker thread: cancel and resend ran parses past max_decode_bytes."""
        served = serve({"e": echo()}, limits=ConnectionLimits(max_decode_bytes=48 * 2**20))
        count = 2**18  # 1 MiB of fp32_contents, parsed on a worker thread: ~32 MiB reserved
        request = typed_fp32("e", count)
        budget = served.server._servicer._budget
        with only_worker_thread_held(served):  # the parse waits for it
            with pytest.raises(grpc.RpcError) as info:
                served.call("ModelInfer", request, timeout=0.5)
            assert info.value.code() == CODE.DEADLINE_EXCEEDED, info.value
            time.sleep(0.5)  # the server has seen the deadline pass
            assert budget.used >= count * 4 * 32
        deadline = time.monotonic() + WAIT
        while budget.used and time.monotonic() < deadline:
            time.sleep(0.01)
        assert budget.used == 0
        (out,) = outputs_of(served.call("ModelInfer", request, timeout=WAIT)).values()
        np.testing.assert_array_equal(out, np.full((1, count), 0.5, np.float32))

    def test_a_server_stopped_with_parses_queued_leaves_no_pending_task(self, caplog: pytest.LogCaptureFixture) -> None:
        """An embedder that stops the server and closes its loop while large requests still wait for a worker
        thread got asyncio's "Task was destroyed but it is pending!" logged for each; their holds are still
        given back once the threads end."""
        served = Served(Repository({"e": echo()}), limits=ConnectionLimits(max_decode_bytes=256 * 2**20))
        try:
            budget = served.server._servicer._budget
            executor, gate, started = ThreadPoolExecutor(1), threading.Event(), threading.Event()
            served._loop.call_soon_threadsafe(served._loop.set_default_executor, executor)
            executor.submit(lambda: (started.set(), gate.wait(WAIT)))  # parses queue behind it
            assert started.wait(WAIT)
            request, count = typed_fp32("e", 2**18), 3
            calls = [served.stub("ModelInfer").future(request, timeout=WAIT) for _ in range(count)]
            deadline = time.monotonic() + WAIT
            while budget.used < count * 2**18 * 4 * 32 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert budget.used >= count * 2**18 * 4 * 32
            threading.Timer(0.5, gate.set).start()
            served.close()  # stop(None), then the loop is closed
            for call in calls:
                with pytest.raises(grpc.RpcError):
                    call.result(WAIT)
            executor.shutdown(wait=True)
            gc.collect()
            assert budget.used == 0
            assert not [r for r in caplog.records if "destroyed but it is pending" in r.getMessage()]
        finally:
            served.repository.close()

    def test_no_parsed_message_is_held_while_its_request_waits_for_the_model(
        self, serve: Callable[..., Served]
    ) -> None:
        """A queued request held its parsed ModelInferRequest (~12-14x its typed bytes, charged to no budget) until
        it was answered; now only its decoded tensors and the names the answer echoes wait with it."""
        predictor, model = gated()
        served = serve({"m": predictor})
        blocker = infer_request("m", {"x": rows(BLOCK)}, id="held").SerializeToString()  # no message on the client
        running = served.stub("ModelInfer").future(blocker, timeout=WAIT)
        assert model.entered.wait(WAIT)
        typed = []
        for i in range(4):
            request = pb.ModelInferRequest(model_name="m", id=f"held{i}")
            request.inputs.add(name="x", datatype="FP64", shape=[1, 3]).contents.fp64_contents.extend([i, 1, 2])
            typed.append(request.SerializeToString())
        del request
        queued = [served.stub("ModelInfer").future(data, timeout=WAIT) for data in typed]
        deadline = time.monotonic() + WAIT
        while predictor.stats().queue_depth < len(queued) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert predictor.stats().queue_depth == len(queued)
        assert not [m for m in gc.get_objects() if type(m) is pb.ModelInferRequest and m.id.startswith("held")]
        model.release.set()
        np.testing.assert_array_equal(outputs_of(running.result(WAIT))["y"], rows(BLOCK) * 2)
        for i, future in enumerate(queued):
            response = future.result(WAIT)
            assert (response.model_name, response.id) == ("m", f"held{i}")
            np.testing.assert_array_equal(outputs_of(response)["y"], [[2 * i, 2, 4]])

    def test_a_stalled_request_message_ends_its_call_after_grpc_message_timeout_s(
        self, serve: Callable[..., Served]
    ) -> None:
        """A call that sent part of its message and stalled held its stream, and what it sent, for as long as
        its client answered pings (grpc.aio waits for a unary message without a limit); now every method ends
        it DEADLINE_EXCEEDED after grpc_message_timeout_s, other connections are served meanwhile, and the
        connection left without calls closes after grpc_idle_s."""
        served = serve({"m": scaled(2)}, limits=ConnectionLimits(grpc_message_timeout_s=1.0, grpc_idle_s=1.0))
        began = time.monotonic()
        with StalledCalls(served.port, ["ModelInfer", "ModelInfer", "ServerLive"]) as stalled:
            good(served)
            assert served.triton.is_server_live()
            assert stalled.ended.wait(WAIT), stalled.trailers
            assert time.monotonic() - began >= 1.0  # not before the limit
            for trailers in stalled.trailers.values():
                assert b"grpc_message_timeout_s=1.0" in trailers, trailers
            assert stalled.closed.wait(WAIT)
        good(served)

    def test_grpc_message_timeout_s_bounds_the_message_not_the_call(self, serve: Callable[..., Served]) -> None:
        """A call whose message arrived runs past grpc_message_timeout_s while its model works, and is answered."""
        predictor, model = gated()
        served = serve({"m": predictor}, limits=ConnectionLimits(grpc_message_timeout_s=0.2))
        running = served.stub("ModelInfer").future(infer_request("m", {"x": rows(BLOCK)}), timeout=WAIT)
        assert model.entered.wait(WAIT)
        time.sleep(0.5)  # past the limit, in the model
        model.release.set()
        np.testing.assert_array_equal(outputs_of(running.result(WAIT))["y"], rows(BLOCK) * 2)

    def test_stop_refuses_new_calls_and_finishes_running_ones(self, serve: Callable[..., Served]) -> None:
        """Once stop begins, a new ModelInfer is UNAVAILABLE at once, and a call already running
        is answered (not CANCELLED) when its model finishes."""
        predictor, model = gated()
        served = serve({"m": predictor})
        running = served.stub("ModelInfer").future(infer_request("m", {"x": rows(BLOCK)}), timeout=WAIT)
        assert model.entered.wait(WAIT)
        stopping = asyncio.run_coroutine_threadsafe(served.server.stop(WAIT), served._loop)
        with pytest.raises(grpc.RpcError) as info:
            served.call("ModelInfer", infer_request("m", {"x": rows(1.0)}), timeout=WAIT)
        assert info.value.code() == CODE.UNAVAILABLE
        model.release.set()
        np.testing.assert_array_equal(outputs_of(running.result(WAIT))["y"], rows(BLOCK) * 2)
        stopping.result(WAIT)
