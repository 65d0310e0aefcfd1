"""A battery of hostile requests, over REST and gRPC, against one live server.

Every answer must be a 4xx (gRPC: INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED, ...) or a
correct one; a model that raises on a request may answer that request 500 (INTERNAL), never
the next ones. Afterwards the server still answers good requests correctly on both faces, and
its memory grew by a bounded amount over the whole battery.
"""

from __future__ import annotations

import gzip
import json
import re
import socket
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from inferkit import Predictor
from inferkit.server import Repository, ServedModel
from inferkit.server import proto as pb
from inferkit.server.protocol import pack_bytes
from inferkit.server.rest_decode import HEADER_LENGTH
from inferkit.server.run import InferenceServer

WAIT = 30  # seconds: a bound on every wait, never expected to be reached
CODE = grpc.StatusCode
W = (np.arange(12, dtype=np.float32).reshape(4, 3) - 5.5) / 4
TABLE = np.arange(20, dtype=np.float32).reshape(10, 2)
RSS_GROWTH_BYTES = 200 * 2**20
HUGE = 2**40  # rows claimed with no data behind them
OK = "ok"  # a correct answer is fine too


# -- models --------------------------------------------------------------------------------


def _onnx(nodes: list[Any], inputs: list[Any], outputs: list[Any], inits: dict[str, np.ndarray]) -> bytes:
    graph = helper.make_graph(
        nodes, "g", inputs, outputs, [onnx.numpy_helper.from_array(a, name) for name, a in inits.items()]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model, full_check=True)
    return bytes(model.SerializeToString())


def _info(name: str, kind: int, dims: list[Any]) -> Any:
    return helper.make_tensor_value_info(name, kind, dims)


def _models() -> dict[str, bytes]:
    f, i64, s = TensorProto.FLOAT, TensorProto.INT64, TensorProto.STRING
    return {
        # x [N, 4] -> x @ W [N, 3]
        "mlp": _onnx(
            [helper.make_node("MatMul", ["x", "W"], ["y"])],
            [_info("x", f, ["N", 4])],
            [_info("y", f, ["N", 3])],
            {"W": W},
        ),
        # x [N, D] -> row sums [N]: a dynamic non-batch dimension
        "sum": _onnx(
            [helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=0)],
            [_info("x", f, ["N", "D"])],
            [_info("y", f, ["N"])],
            {"axes": np.array([1], np.int64)},
        ),
        # x [N, K] @ W [4, 3]: ONNX Runtime raises at run time unless K == 4
        "matmul": _onnx(
            [helper.make_node("MatMul", ["x", "W"], ["y"])],
            [_info("x", f, ["N", "K"])],
            [_info("y", f, ["N", 3])],
            {"W": W},
        ),
        # ids [N] -> TABLE[ids] [N, 2]: ONNX Runtime raises for an id out of range
        "gather": _onnx(
            [helper.make_node("Gather", ["T", "ids"], ["y"], axis=0)],
            [_info("ids", i64, ["N"])],
            [_info("y", f, ["N", 2])],
            {"T": TABLE},
        ),
        # text [N] -> text
        "text": _onnx(
            [helper.make_node("Identity", ["text"], ["out"])], [_info("text", s, ["N"])], [_info("out", s, ["N"])], {}
        ),
        # x [N, D] -> x @ x.T [N, N]: the output's width depends on the batch
        "gram": _onnx(
            [helper.make_node("Transpose", ["x"], ["xt"]), helper.make_node("MatMul", ["x", "xt"], ["y"])],
            [_info("x", f, ["N", "D"])],
            [_info("y", f, ["N", "N"])],
            {},
        ),
    }


@pytest.fixture(scope="module", name="server")
def _server() -> Iterator[InferenceServer]:
    predictors = {
        name: Predictor.from_onnx(model, name=name, max_batch_size=8, warmup=False) for name, model in _models().items()
    }
    repository = Repository([ServedModel(name, p) for name, p in predictors.items()])
    server = InferenceServer(repository, port=0, grpc_port=0, grace=5.0, loop="asyncio").start(WAIT)
    yield server
    server.join(WAIT)


@pytest.fixture(scope="module", name="http")
def _http(server: InferenceServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=WAIT) as client:
        yield client


@pytest.fixture(scope="module", name="channel")
def _channel(server: InferenceServer) -> Iterator[grpc.Channel]:
    options = [("grpc.max_send_message_length", 2**30), ("grpc.max_receive_message_length", 2**30)]
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}", options=options) as channel:
        for request in WARMUP:  # a call with a deadline starts its model's timer thread: here, not in a test
            _infer(channel, request)
        yield channel


# -- good requests, and what they answer ------------------------------------------------------

X = np.arange(8, dtype=np.float32).reshape(2, 4)


def _rest_good(http: httpx.Client) -> None:
    body = {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": X.ravel().tolist()}]}
    response = http.post("/v2/models/mlp/infer", json=body)
    assert response.status_code == 200, response.text
    y = np.array(response.json()["outputs"][0]["data"], np.float32).reshape(2, 3)
    np.testing.assert_allclose(y, X @ W, rtol=1e-6)


def _infer(channel: grpc.Channel, request: Any) -> Any:
    stub = channel.unary_unary(
        f"/{pb.SERVICE}/ModelInfer",
        request_serializer=lambda m: m if isinstance(m, bytes) else m.SerializeToString(),
        response_deserializer=pb.ModelInferResponse.FromString,
    )
    return stub(request, timeout=WAIT)


def _grpc_request(model: str, inputs: dict[str, tuple[str, list[int], bytes]], **fields: Any) -> Any:
    request = pb.ModelInferRequest(model_name=model, **fields)
    for name, (datatype, shape, raw) in inputs.items():
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        request.raw_input_contents.append(raw)
    return request


WARMUP = [
    _grpc_request("mlp", {"x": ("FP32", [2, 4], X.tobytes())}),
    _grpc_request("sum", {"x": ("FP32", [2, 4], X.tobytes())}),
    _grpc_request("matmul", {"x": ("FP32", [2, 4], X.tobytes())}),
    _grpc_request("gather", {"ids": ("INT64", [2], np.array([1, 2], np.int64).tobytes())}),
    _grpc_request("text", {"text": ("BYTES", [1], pack_bytes(np.array([b"a"], dtype=object)))}),
    _grpc_request("gram", {"x": ("FP32", [2, 4], X.tobytes())}),
]


def _outcome(channel: grpc.Channel, request: Any) -> tuple[Any, str]:
    """The status code of a ModelInfer call (``OK`` for an answer) and its details."""
    try:
        _infer(channel, request)
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    return OK, ""


def _grpc_good(channel: grpc.Channel) -> None:
    response = _infer(channel, _grpc_request("mlp", {"x": ("FP32", [2, 4], X.tobytes())}))
    y = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(2, 3)
    np.testing.assert_allclose(y, X @ W, rtol=1e-6)


def _rss_bytes() -> int:
    found = re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text())
    assert found is not None
    return int(found.group(1)) * 1024


# -- the REST battery ----------------------------------------------------------------------

FAILED_MODEL = "model raised"  # 500 for this request, and nothing more


def _j(
    model: str, name: str, datatype: str, shape: list[int], data: Any, **top: Any
) -> tuple[str, bytes, dict[str, str]]:
    body = {"inputs": [{"name": name, "shape": shape, "datatype": datatype, "data": data}], **top}
    return model, json.dumps(body).encode(), {}


def _b(
    model: str, tensors: list[dict[str, Any]], raw: bytes, length: int | None = None
) -> tuple[str, bytes, dict[str, str]]:
    header = json.dumps({"inputs": tensors}).encode()
    return model, header + raw, {HEADER_LENGTH: str(len(header) if length is None else length)}


REST: list[Any] = [
    pytest.param(("mlp", b"{nope", {}), 400, id="malformed JSON"),
    pytest.param(("mlp", b"[" * 200_000, {}), 400, id="deep nesting"),
    pytest.param(_j("mlp", "x", "FP32", [2, 4], ["a"] * 8), 400, id="strings for FP32"),
    pytest.param(_j("mlp", "x", "INT64", [2, 4], list(range(8))), 400, id="wrong datatype for the model"),
    pytest.param(_j("mlp", "x", "FP32", [2, 4], list(range(7))), 400, id="shape vs data"),
    pytest.param(_j("mlp", "x", "FP32", [2**62, 2**62], []), 400, id="huge shape, no data"),
    pytest.param(_j("mlp", "x", "FP32", [2**62] * 100_000, []), 400, id="a hundred thousand huge dims"),
    pytest.param(_j("mlp", "x", "FP32", [HUGE, 4], []), 400, id="2**40 rows of 4, no data"),
    pytest.param(
        _j("sum", "x", "FP32", [HUGE, 0], []),
        400,
        id="2**40 zero-width rows",
    ),
    pytest.param(_j("sum", "x", "FP32", [3, 0], []), (400, OK), id="three zero-width rows"),
    pytest.param(_j("mlp", "x", "FP32", [2, 4], list(range(8)), outputs=[{"name": "q"}]), 400, id="unknown output"),
    pytest.param(
        _j("mlp", "x", "FP32", [2, 4], list(range(8)), outputs=[{"name": f"o{i}"} for i in range(100_000)]),
        400,
        id="a hundred thousand outputs",
    ),
    pytest.param(("nope", b"{}", {}), 404, id="unknown model"),
    pytest.param(_j("mlp", "z", "FP32", [2, 4], list(range(8))), 400, id="unknown input"),
    pytest.param(
        (
            "mlp",
            json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1] * 4}] * 2}).encode(),
            {},
        ),
        400,
        id="duplicate inputs",
    ),
    pytest.param(_j("matmul", "x", "FP32", [2, 5], [1.0] * 10), FAILED_MODEL, id="wrong inner size"),
    pytest.param(_j("gather", "ids", "INT64", [2], [1, 99]), FAILED_MODEL, id="id out of range"),
    pytest.param(_j("gather", "ids", "INT64", [1], [2**70]), 400, id="id past INT64"),
    pytest.param(_j("text", "text", "BYTES", [2], ["a", 1]), 400, id="a number for BYTES"),
    pytest.param(_j("mlp", "x", "FP32", [2, 4], [1.0] * 7 + [True]), 400, id="a boolean among FP32"),
    pytest.param(_j("gather", "ids", "INT64", [2], [1, False]), 400, id="a boolean among INT64"),
    pytest.param(_j("sum", "x", "FP32", [1, 100], [[0.5] * 99 + [True]]), 400, id="a boolean in a large tensor"),
    pytest.param(
        _j("text", "text", "BYTES", [2], ["é", "\u0000"]),
        OK,
        id="unicode BYTES",
    ),
    pytest.param(_j("gram", "x", "FP32", [3, 2], [1.0] * 6), OK, id="gram"),
    pytest.param(
        _b(
            "mlp",
            [{"name": "x", "shape": [2, 4], "datatype": "FP32", "parameters": {"binary_data_size": 32}}],
            b"\0" * 16,
        ),
        400,
        id="binary size lies",
    ),
    pytest.param(
        _b(
            "mlp",
            [{"name": "x", "shape": [2, 4], "datatype": "FP32", "parameters": {"binary_data_size": 32}}],
            b"\0" * 32,
            10**6,
        ),
        400,
        id="header length past the body",
    ),
    pytest.param(
        _b("mlp", [{"name": "x", "shape": [HUGE, 4], "datatype": "FP32", "parameters": {"binary_data_size": 0}}], b""),
        400,
        id="2**40 binary rows, no bytes",
    ),
    pytest.param(
        _b(
            "text",
            [{"name": "text", "shape": [HUGE], "datatype": "BYTES", "parameters": {"binary_data_size": 8}}],
            b"\0" * 8,
        ),
        400,
        id="BYTES count lies",
    ),
    pytest.param(
        _b(
            "text",
            [{"name": "text", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 6}}],
            b"\xff\xff\xff\xffab",
        ),
        400,
        id="BYTES length lies",
    ),
    pytest.param(
        _b(
            "text",
            [{"name": "text", "shape": [2], "datatype": "BYTES", "parameters": {"binary_data_size": 12}}],
            pack_bytes(np.array([b"\xff\xfe", b"ok"], dtype=object)),
        ),
        400,  # ONNX Runtime string tensors hold UTF-8 text only
        id="BYTES not UTF-8",
    ),
    pytest.param(("mlp", b"{}", {HEADER_LENGTH: "\xb2"}), 400, id="header length a non-ASCII digit"),
    pytest.param(("mlp", b"{}", {HEADER_LENGTH: "9" * 5000}), 400, id="header length of 5,000 digits"),
    pytest.param(("mlp", b"{}", {HEADER_LENGTH: "-1"}), 400, id="negative header length"),
    pytest.param(("mlp", gzip.compress(b" " * (64 * 2**20 + 1)), {"Content-Encoding": "gzip"}), 413, id="gzip bomb"),
    pytest.param(("mlp", zlib.compress(b"[" * 2**20), {"Content-Encoding": "deflate"}), 400, id="deflate of brackets"),
    pytest.param(("mlp", gzip.compress(b"{}")[:-4], {"Content-Encoding": "gzip"}), 400, id="truncated gzip"),
    pytest.param(("mlp", b"{}", {"Content-Encoding": "br"}), 415, id="unknown encoding"),
    pytest.param(
        _j("mlp", "x", "FP32", [2, 4], list(range(8)), parameters={"timeout": 10**30}), OK, id="timeout of 10**30 us"
    ),
    pytest.param(
        _j("mlp", "x", "FP32", [2, 4], list(range(8)), parameters={"priority": 2**64 - 1}), OK, id="priority 2**64 - 1"
    ),
    pytest.param(_j("mlp", "x", "FP32", [2, 4], list(range(8)), parameters={"sequence_id": 1}), 400, id="sequence id"),
]


Y8 = (np.arange(8, dtype=np.float32).reshape(2, 4) @ W).tolist()
ANSWERS: dict[str, Any] = {  # the first output of a 200, where the case has one to check
    "three zero-width rows": [0.0, 0.0, 0.0],
    "unicode BYTES": ["é", "\u0000"],
    "gram": [[2.0] * 3] * 3,
    "timeout of 10**30 us": Y8,
    "priority 2**64 - 1": Y8,
}


class TestRestBattery:
    """Hostile requests over HTTP: each a 4xx (or a correct answer), and the server keeps serving."""

    @pytest.mark.parametrize(("request_", "expected"), REST)
    def test_hostile_request(
        self,
        http: httpx.Client,
        request: pytest.FixtureRequest,
        request_: tuple[str, bytes, dict[str, Any]],
        expected: Any,
    ) -> None:
        """One hostile request answers as expected; a good request right after is answered correctly."""
        model, body, headers = request_
        raw_headers = [(k.encode(), v.encode("latin-1")) for k, v in headers.items()]
        response = http.post(f"/v2/models/{model}/infer", content=body, headers=raw_headers)
        allowed = expected if isinstance(expected, tuple) else (expected,)
        status = response.status_code
        if FAILED_MODEL in allowed:
            assert status in {400, 500}, response.text  # the model's own error, for this request only
        elif status == 200:
            assert OK in allowed, response.text
            want = ANSWERS.get(request.node.callspec.id)
            if want is not None:
                out = response.json()["outputs"][0]
                if out["datatype"] == "BYTES":  # not through np.array: its str dtype drops trailing NULs
                    assert out["data"] == want
                else:
                    np.testing.assert_allclose(np.array(out["data"]).reshape(out["shape"]), want, rtol=1e-6)
        else:
            assert status in allowed, response.text
        if status != 200:
            assert response.json()["error"]
        _rest_good(http)

    @pytest.mark.parametrize("body", [b"[" * 5000 + b"NaN" + b"]" * 5000, b"[" * 5000 + b"]" * 5000])
    def test_json_nested_thousands_deep_is_400_on_every_endpoint(self, http: httpx.Client, body: bytes) -> None:
        """With a NaN in it, the stdlib parser (which reads NaN) raised RecursionError: a 500 with a traceback."""
        for path in ("/v2/repository/index", "/v2/models/mlp/infer"):
            response = http.post(path, content=body)
            assert response.status_code == 400, (path, response.text)
            assert "not" in response.json()["error"]
        _rest_good(http)

    @pytest.mark.parametrize(
        "head",
        [
            b"Content-Length: \xb2\r\n",
            b"Content-Length: " + b"9" * 5000 + b"\r\n",
            b"Content-Length: 2\r\nContent-Length: 3\r\n",
            b"Transfer-Encoding: chunked\r\nContent-Length: 2\r\n",
            b"X-Many: " + b"a" * 200_000 + b"\r\n",
            HEADER_LENGTH.encode() + b": \xd9\xa3\r\n",
        ],
        ids=[
            "non-ASCII content length",
            "5,000-digit content length",
            "two lengths",
            "chunked and length",
            "a huge header",
            "Arabic digit",
        ],
    )
    def test_header_abuse_over_a_raw_socket(self, server: InferenceServer, http: httpx.Client, head: bytes) -> None:
        """Malformed headers get a 4xx or a closed connection, never a 5xx."""
        with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT) as sock:
            sock.sendall(b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n{}")
            sock.shutdown(socket.SHUT_WR)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        if answer:
            status = int(answer.split(b" ", 2)[1])
            assert 400 <= status < 500, answer[:300]
        _rest_good(http)


# -- the gRPC battery ----------------------------------------------------------------------


def _bad_framing() -> Any:
    return _grpc_request("text", {"text": ("BYTES", [2], b"\x05\0\0\0ab")})


GRPC: list[Any] = [
    pytest.param(b"\xff\xff\xff", CODE.INVALID_ARGUMENT, id="not a message"),
    pytest.param(_grpc_request("nope", {"x": ("FP32", [2, 4], X.tobytes())}), CODE.NOT_FOUND, id="unknown model"),
    pytest.param(
        _grpc_request("mlp", {"x": ("FP32", [2, 4], X.tobytes()[:-1])}), CODE.INVALID_ARGUMENT, id="raw size lies"
    ),
    pytest.param(
        _grpc_request("mlp", {"x": ("FP32", [HUGE, 4], b"")}), CODE.INVALID_ARGUMENT, id="2**40 rows, no bytes"
    ),
    pytest.param(
        _grpc_request("sum", {"x": ("FP32", [HUGE, 0], b"")}),
        CODE.INVALID_ARGUMENT,
        id="2**40 zero-width rows",
    ),
    pytest.param(
        _grpc_request("mlp", {"x": ("FP32", [2**63 - 1] * 100_000, b"")}),
        CODE.INVALID_ARGUMENT,
        id="a hundred thousand huge dims",
    ),
    pytest.param(
        _grpc_request("mlp", {"x": ("FP32", [2, 4], X.tobytes())}, outputs=[{"name": "q"}]),
        CODE.INVALID_ARGUMENT,
        id="unknown output",
    ),
    pytest.param(
        _grpc_request("gather", {"ids": ("INT64", [2], np.array([1, 99], np.int64).tobytes())}),
        CODE.INTERNAL,
        id="id out of range",
    ),
    pytest.param(
        _grpc_request("matmul", {"x": ("FP32", [2, 5], np.ones(10, np.float32).tobytes())}),
        CODE.INTERNAL,
        id="wrong inner size",
    ),
    pytest.param(_bad_framing(), CODE.INVALID_ARGUMENT, id="bad BYTES framing"),
    pytest.param(
        _grpc_request("text", {"text": ("BYTES", [HUGE], b"\0" * 8)}), CODE.INVALID_ARGUMENT, id="BYTES count lies"
    ),
    pytest.param(_grpc_request("gram", {"x": ("FP32", [3, 2], np.ones(6, np.float32).tobytes())}), OK, id="gram"),
]


def _duplicate() -> Any:
    request = _grpc_request("mlp", {"x": ("FP32", [2, 4], X.tobytes())})
    request.inputs.add().CopyFrom(request.inputs[0])
    request.raw_input_contents.append(X.tobytes())
    return request


GRPC.append(pytest.param(_duplicate(), CODE.INVALID_ARGUMENT, id="duplicate inputs"))


class TestGrpcBattery:
    """Hostile requests over gRPC: each a client-error code (or a correct answer), and the server keeps serving."""

    @pytest.mark.parametrize(("request_", "expected"), GRPC)
    def test_hostile_request(self, channel: grpc.Channel, request_: Any, expected: Any) -> None:
        """One hostile request answers as expected; a good request right after is answered correctly."""
        code, details = _outcome(channel, request_)
        assert code == expected, details
        assert details or code == OK
        _grpc_good(channel)


class TestAfterTheBattery:
    """The server survives the whole battery replayed, with bounded memory growth."""

    def test_replayed_battery_leaves_the_server_serving_with_bounded_memory(
        self, server: InferenceServer, http: httpx.Client, channel: grpc.Channel
    ) -> None:
        """Every runnable case three times: then good requests succeed on both faces, and RSS grew < 200 MB."""
        _rest_good(http)
        _grpc_good(channel)
        before = _rss_bytes()
        # the requests a model raises on are left to the next test: today they eject the replica
        rest = [p.values for p in REST if not p.marks and p.values[1] != FAILED_MODEL]
        grpc_cases = [p.values for p in GRPC if not p.marks and p.values[1] != CODE.INTERNAL]
        for _ in range(3):
            for (model, body, headers), _expected in rest:
                raw_headers = [(k.encode(), v.encode("latin-1")) for k, v in headers.items()]
                status = http.post(f"/v2/models/{model}/infer", content=body, headers=raw_headers).status_code
                assert status < 500, (model, status)
            for request, expected in grpc_cases:
                assert _outcome(channel, request)[0] == expected
        growth = _rss_bytes() - before
        assert growth < RSS_GROWTH_BYTES, f"RSS grew by {growth / 2**20:.0f} MiB"
        assert http.get("/v2/health/live").json() == {"live": True}
        assert http.get("/v2/health/ready").status_code == 200
        _rest_good(http)
        _grpc_good(channel)

    def test_requests_a_model_raises_on_fail_alone(self, http: httpx.Client, channel: grpc.Channel) -> None:
        """Ten requests the model raises on (500 / INTERNAL each), then good ones to the same models succeed."""
        for _ in range(5):
            assert (
                http.post("/v2/models/gather/infer", content=_j("gather", "ids", "INT64", [1], [99])[1]).status_code
                == 500
            )
            with pytest.raises(grpc.RpcError) as caught:
                _infer(channel, _grpc_request("matmul", {"x": ("FP32", [1, 5], np.ones(5, np.float32).tobytes())}))
            assert caught.value.code() == CODE.INTERNAL
        response = http.post("/v2/models/gather/infer", content=_j("gather", "ids", "INT64", [2], [1, 9])[1])
        assert response.status_code == 200, response.text
        np.testing.assert_array_equal(np.array(response.json()["outputs"][0]["data"]).reshape(2, 2), TABLE[[1, 9]])
        answer = _infer(channel, _grpc_request("matmul", {"x": ("FP32", [2, 4], X.tobytes())}))
        np.testing.assert_allclose(
            np.frombuffer(answer.raw_output_contents[0], np.float32).reshape(2, 3), X @ W, rtol=1e-6
        )
