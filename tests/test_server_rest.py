"""The REST face: a real uvicorn server, real tritonclient.http, and an in-process fuzzer."""

from __future__ import annotations

import asyncio
import gzip
import json
import random
import re
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np
import onnx
import prometheus_client
import pytest
import tritonclient.http as triton
import uvicorn
from onnx import TensorProto, helper
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from tritonclient.utils import InferenceServerException

from inferkit import BatchConfig, Predictor, Router, TensorSpec
from inferkit.server import Repository, ServedModel
from inferkit.server.metrics import Metrics
from inferkit.server.protocol import DTYPES, pack_bytes
from inferkit.server.rest import create_app
from inferkit.server.rest_decode import HEADER_LENGTH, _array_bools

WAIT = 30  # seconds: a bound on every wait, never expected to be reached
W = (np.arange(12, dtype=np.float32).reshape(4, 3) - 5.5) / 4
B = np.array([0.5, -1.0, 2.0], dtype=np.float32)
NUMERIC = [d for d in DTYPES if d != "BYTES"]


# -- models --------------------------------------------------------------------------------


def _onnx(nodes: list[Any], inputs: list[Any], outputs: list[Any], inits: list[np.ndarray] | None = None) -> bytes:
    names = iter(["W", "B", "k"])
    graph = helper.make_graph(
        nodes, "g", inputs, outputs, [onnx.numpy_helper.from_array(a, next(names)) for a in inits or []]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model, full_check=True)
    return bytes(model.SerializeToString())


def _tensor(name: str, kind: int, dims: list[Any]) -> Any:
    return helper.make_tensor_value_info(name, kind, dims)


def _mlp() -> Predictor:
    """x FP32 [N, 4] -> y = x @ W + B, FP32 [N, 3]."""
    model = _onnx(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "B"], ["y"])],
        [_tensor("x", TensorProto.FLOAT, ["N", 4])],
        [_tensor("y", TensorProto.FLOAT, ["N", 3])],
        [W, B],
    )
    return Predictor.from_onnx(model, name="mlp", max_batch_size=16, warmup=False)


def _two_outputs() -> Predictor:
    """x FP32 [N, 4] -> y = 2 x [N, 4] and s = row sums [N]."""
    model = _onnx(
        [
            helper.make_node("Mul", ["x", "W"], ["y"]),
            helper.make_node("ReduceSum", ["x", "B"], ["s"], keepdims=0),
        ],
        [_tensor("x", TensorProto.FLOAT, ["N", 4])],
        [_tensor("y", TensorProto.FLOAT, ["N", 4]), _tensor("s", TensorProto.FLOAT, ["N"])],
        [np.array(2.0, dtype=np.float32), np.array([1], dtype=np.int64)],
    )
    return Predictor.from_onnx(model, name="two", max_batch_size=16, warmup=False)


def _ints() -> Predictor:
    """a, b INT64 [N, 3] -> sum INT64 [N, 3] (two inputs, so binary offsets matter)."""
    model = _onnx(
        [helper.make_node("Add", ["a", "b"], ["sum"])],
        [_tensor("a", TensorProto.INT64, ["N", 3]), _tensor("b", TensorProto.INT64, ["N", 3])],
        [_tensor("sum", TensorProto.INT64, ["N", 3])],
    )
    return Predictor.from_onnx(model, name="ints", max_batch_size=16, warmup=False)


def _upper(text: np.ndarray) -> dict[str, np.ndarray]:
    upper = np.array([t.upper() for t in text], dtype=object)
    return {"upper": upper, "length": np.array([len(t) for t in text], dtype=np.int64)}


def _text() -> Predictor:
    """text BYTES [N] -> upper BYTES [N] and length INT64 [N]."""
    return Predictor.from_callable(
        _upper,
        inputs=[TensorSpec("text", object, (None,))],
        outputs=[TensorSpec("upper", object, (None,)), TensorSpec("length", np.int64, (None,))],
        name="text",
    )


def _echo(inputs: np.ndarray | dict[str, np.ndarray]) -> np.ndarray | dict[str, np.ndarray]:
    if isinstance(inputs, np.ndarray):  # one input reaches an untyped function as a bare array
        return inputs
    return {f"{name}_out": array for name, array in inputs.items()}


def _scale(k: float, name: str, width: int = 4, max_batch_size: int = 64, **options: Any) -> Predictor:
    def fn(x: np.ndarray) -> np.ndarray:
        return x * np.float32(k)

    spec = [TensorSpec("x", np.float32, (None, width))]
    out = [TensorSpec("y", np.float32, (None, width))]
    return Predictor.from_callable(fn, inputs=spec, outputs=out, name=name, max_batch_size=max_batch_size, **options)


def _repository() -> Repository:
    one, two = _scale(2.0, "clf-1"), _scale(3.0, "clf-2")
    return Repository(
        [
            ServedModel("mlp", _mlp()),
            ServedModel("two", _two_outputs()),
            ServedModel("ints", _ints()),
            ServedModel("text", _text()),
            ServedModel("echo", Predictor.from_callable(_echo, name="echo")),
            ServedModel("big", _scale(1.0, "big", width=4096, max_batch_size=1024)),
            ServedModel("clf", Router({"1": one, "2": two}, seed=0), {"1": one, "2": two}),
        ]
    )


# -- a real server -------------------------------------------------------------------------


class Server:
    """uvicorn serving ``app`` on a free port of 127.0.0.1, in a background thread."""

    def __init__(self, app: Starlette) -> None:
        config = uvicorn.Config(
            app, port=0, lifespan="off", ws="none", http="h11", loop="asyncio", log_level="warning", access_log=False
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="test-uvicorn", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + WAIT
        while not self.server.started:  # uvicorn has no start event
            assert self.thread.is_alive(), "uvicorn did not start"
            assert time.monotonic() < deadline, "uvicorn did not start in time"
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(WAIT)
        assert not self.thread.is_alive()


@pytest.fixture(scope="module", name="repository")
def _repository_fixture() -> Iterator[Repository]:
    repository = _repository()
    yield repository
    repository.close()


@pytest.fixture(scope="module", name="server")
def _server_fixture(repository: Repository) -> Iterator[Server]:
    server = Server(create_app(repository))
    yield server
    server.stop()


@pytest.fixture(name="http")
def _http(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=WAIT) as client:
        yield client


class TritonClient(triton.InferenceServerClient):  # type: ignore[misc]
    """tritonclient.http's client, closed explicitly by the fixture.

    Its ``__del__`` closes it again, from whichever thread the garbage collector happens to run
    on (a batcher's, uvicorn's), and gevent raises there (``InvalidThreadUseError``), which
    pytest reports against an unrelated test.
    """

    def __del__(self) -> None:
        pass


@pytest.fixture(name="triton_client")
def _triton_client(server: Server) -> Iterator[triton.InferenceServerClient]:
    client = TritonClient(f"127.0.0.1:{server.port}")
    yield client
    client.close()


# -- request and response helpers ----------------------------------------------------------


def _datatype(arr: np.ndarray) -> str:
    return "BYTES" if arr.dtype.kind in "OSU" else next(k for k, v in DTYPES.items() if v == arr.dtype)


def _json_input(name: str, arr: np.ndarray, nested: bool = False) -> dict[str, Any]:
    if arr.dtype.kind == "O":
        data: Any = [x.decode() for x in arr.reshape(-1)]
    else:
        data = arr.tolist() if nested else arr.reshape(-1).tolist()
    return {"name": name, "shape": list(arr.shape), "datatype": _datatype(arr), "data": data}


def _json_body(inputs: dict[str, np.ndarray], **extra: Any) -> bytes:
    return json.dumps({"inputs": [_json_input(k, v) for k, v in inputs.items()], **extra}).encode()


def _binary_body(inputs: dict[str, np.ndarray], **extra: Any) -> tuple[bytes, dict[str, str]]:
    tensors, raws = [], []
    for name, arr in inputs.items():
        raw = pack_bytes(arr) if arr.dtype.kind == "O" else arr.tobytes()
        raws.append(raw)
        params = {"binary_data_size": len(raw)}
        tensors.append({"name": name, "shape": list(arr.shape), "datatype": _datatype(arr), "parameters": params})
    header = json.dumps({"inputs": tensors, **extra}).encode()
    return header + b"".join(raws), {HEADER_LENGTH: str(len(header))}


def _decode(response: httpx.Response) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The response's JSON header and its outputs as arrays (BYTES as bytes objects)."""
    assert response.status_code == 200, response.text
    length = response.headers.get(HEADER_LENGTH)
    content = response.content
    offset = int(length) if length is not None else len(content)
    header = json.loads(content[:offset])
    outputs = {}
    for tensor in header["outputs"]:
        dtype = DTYPES[tensor["datatype"]]
        size = tensor.get("parameters", {}).get("binary_data_size")
        if size is None:
            data = tensor["data"]
            arr = np.array([s.encode() for s in data], dtype=object) if dtype.kind == "O" else np.array(data, dtype)
        else:
            raw = content[offset : offset + size]
            offset += size
            if dtype.kind == "O":
                from inferkit.server.protocol import unpack_bytes

                arr = unpack_bytes(raw, int(np.prod(tensor["shape"])), tensor["name"])
            else:
                arr = np.frombuffer(raw, dtype)
        outputs[tensor["name"]] = arr.reshape(tensor["shape"])
    assert offset == len(content)
    return header, outputs


def _infer(http: httpx.Client, model: str, body: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    return http.post(f"/v2/models/{model}/infer", content=body, headers=headers or {})


def _x(n: int = 3) -> np.ndarray:
    return np.arange(n * 4, dtype=np.float32).reshape(n, 4) / 7


def _every_dtype() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {}
    for name in NUMERIC:
        dtype = DTYPES[name]
        if dtype.kind == "b":
            arr = rng.integers(0, 2, (2, 3)).astype(bool)
        elif dtype.kind in "iu":
            info = np.iinfo(dtype)
            arr = np.array([[info.min, info.max, 0], [1, 2, 3]], dtype=dtype)
        else:
            arr = rng.standard_normal((2, 3)).astype(dtype)
        arrays[name] = arr
    return arrays


# -- tests ---------------------------------------------------------------------------------


class TestHealthAndMetadata:
    """Health, readiness and metadata endpoints."""

    def test_live_and_ready(self, http: httpx.Client) -> None:
        """A server whose models are loaded is live and ready."""
        assert http.get("/v2/health/live").json() == {"live": True}
        assert http.get("/v2/health/ready").json() == {"ready": True}
        assert http.get("/v2/models/mlp/ready").status_code == 200
        assert http.get("/v2/models/clf/versions/2/ready").status_code == 200

    def test_server_metadata(self, http: httpx.Client) -> None:
        """/v2 names the server and the binary tensor data extension."""
        meta = http.get("/v2").json()
        assert meta["name"] == "inferkit"
        assert "binary_tensor_data" in meta["extensions"]

    def test_model_metadata(self, http: httpx.Client) -> None:
        """Model metadata gives protocol datatypes and -1 for dynamic dims."""
        meta = http.get("/v2/models/mlp").json()
        assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
        assert meta["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}]
        assert http.get("/v2/models/clf").json()["versions"] == ["1", "2"]
        assert http.get("/v2/models/clf/versions/1").json()["inputs"][0]["name"] == "x"
        assert http.get("/v2/models/text").json()["inputs"][0]["datatype"] == "BYTES"

    @pytest.mark.parametrize(
        "path",
        ["/v2/models/nope", "/v2/models/nope/ready", "/v2/models/clf/versions/9", "/v2/models/clf/versions/9/ready"],
    )
    def test_unknown_model_or_version_is_404(self, http: httpx.Client, path: str) -> None:
        """An unknown model or version is a 404 that names what exists."""
        response = http.get(path)
        assert response.status_code == 404
        error = response.json()["error"]
        assert error.startswith(
            (
                "Request for unknown model: 'nope' is not found",
                "Request for unknown model: 'clf' version 9 is not found",
            )
        )

    def test_unknown_route_and_method_are_json_errors(self, http: httpx.Client) -> None:
        """The router's own 404 and 405 use the protocol's error body too."""
        missing = http.get("/v3/whatever")
        assert missing.status_code == 404
        assert "error" in missing.json()
        wrong = http.get("/v2/models/mlp/infer")
        assert wrong.status_code == 405
        assert "error" in wrong.json()

    def test_not_ready_until_loaded_and_after_close(self) -> None:
        """Readiness is false for a closed model; the server is not ready while one model is not."""
        closed = _scale(1.0, "closed")
        live = _scale(1.0, "live")
        closed.close()
        app = create_app(Repository({"closed": closed, "live": live}))

        async def run() -> None:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                assert (await client.get("/v2/health/ready")).status_code == 503
                assert (await client.get("/v2/models/closed/ready")).json() == {"ready": False}
                assert (await client.get("/v2/models/live/ready")).status_code == 200
                response = await client.post("/v2/models/closed/infer", content=_json_body({"x": _x()}))
                assert response.status_code == 503
                assert "Retry-After" in response.headers

        try:
            asyncio.run(run())
        finally:
            live.close()


class TestInferJson:
    """Tensors as JSON."""

    def test_fp32_flat_and_nested(self, http: httpx.Client) -> None:
        """FP32 data flat or nested row-major gives the model's output; the id is echoed."""
        x = _x()
        for nested in (False, True):
            body = json.dumps({"id": "req-7", "inputs": [_json_input("x", x, nested)]}).encode()
            header, out = _decode(_infer(http, "mlp", body))
            np.testing.assert_allclose(out["y"], x @ W + B, rtol=1e-6)
            assert header["id"] == "req-7"
            assert header["model_name"] == "mlp"
            assert header["outputs"][0]["datatype"] == "FP32"
            assert "parameters" not in header  # no Router, no arm

    def test_int64_two_inputs(self, http: httpx.Client) -> None:
        """Two INT64 inputs, values at the edges of the range that JSON numbers can hold exactly."""
        a = np.array([[1, -2, 3], [2**40, 0, -(2**40)]], dtype=np.int64)
        b = np.array([[10, 20, 30], [1, 1, 1]], dtype=np.int64)
        _, out = _decode(_infer(http, "ints", _json_body({"a": a, "b": b})))
        assert out["sum"].dtype == np.int64
        np.testing.assert_array_equal(out["sum"], a + b)

    def test_bytes(self, http: httpx.Client) -> None:
        """BYTES inputs are UTF-8 strings in JSON, and come back as strings."""
        text = np.array(["héllo".encode(), b"", b"world"], dtype=object)
        header, out = _decode(_infer(http, "text", _json_body({"text": text})))
        assert list(out["upper"]) == ["HéLLO".encode(), b"", b"WORLD"]  # bytes.upper() is ASCII only
        np.testing.assert_array_equal(out["length"], [6, 0, 5])
        assert header["outputs"][0]["data"] == ["HéLLO", "", "WORLD"]

    def test_two_outputs_and_output_filter(self, http: httpx.Client) -> None:
        """Every output by default; only those asked for, in that order, with ``outputs``."""
        x = _x(2)
        header, out = _decode(_infer(http, "two", _json_body({"x": x})))
        assert sorted(out) == ["s", "y"]
        np.testing.assert_allclose(out["s"], x.sum(axis=1), rtol=1e-6)
        header, out = _decode(_infer(http, "two", _json_body({"x": x}, outputs=[{"name": "s"}])))
        assert [t["name"] for t in header["outputs"]] == ["s"]
        _, out = _decode(_infer(http, "two", _json_body({"x": x}, outputs=[])))  # an empty list: every one
        assert sorted(out) == ["s", "y"]

    def test_every_datatype(self, http: httpx.Client) -> None:
        """Each numeric datatype survives a JSON round trip through an echo model exactly."""
        for name, arr in _every_dtype().items():
            header, out = _decode(_infer(http, "echo", _json_body({"v": arr})))
            assert header["outputs"][0]["datatype"] == name
            np.testing.assert_array_equal(out["output"], arr)  # one output of an untyped model
            assert out["output"].dtype == arr.dtype

    def test_nan_and_infinities_go_both_ways_exactly(
        self, http: httpx.Client, triton_client: triton.InferenceServerClient
    ) -> None:
        """As Triton: NaN, Infinity and -Infinity in JSON data are read, and written out rather than as null
        (which reads back as NaN, so -inf came back as nan); tritonclient gets them back exactly."""
        values = np.array([[np.nan, np.inf, -np.inf, 1.5]], np.float32)
        body = b'{"inputs":[{"name":"v","shape":[1,4],"datatype":"FP32","data":[NaN,Infinity,-Infinity,1.5]}]}'
        response = _infer(http, "echo", body)
        assert response.status_code == 200, response.text
        assert b"[NaN,Infinity,-Infinity,1.5]" in response.content
        np.testing.assert_array_equal(_decode(response)[1]["output"], values)
        tensor = triton.InferInput("v", [1, 4], "FP32")
        tensor.set_data_from_numpy(values, binary_data=False)
        result = triton_client.infer(
            "echo", [tensor], outputs=[triton.InferRequestedOutput("output", binary_data=False)]
        )
        np.testing.assert_array_equal(result.as_numpy("output"), values)
        assert _infer(http, "echo", b'{"inputs": [NaN').status_code == 400  # still malformed

    def test_json_ints_for_a_float_input(self, http: httpx.Client) -> None:
        """Integer JSON numbers are fine for an FP32 input."""
        body = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]})
        _, out = _decode(_infer(http, "mlp", body.encode()))
        np.testing.assert_allclose(out["y"], np.array([[1, 2, 3, 4]], np.float32) @ W + B, rtol=1e-6)


def _bools_message(datatype: str, name: str) -> str:
    return f"input {name!r}: {datatype} data cannot hold booleans"


def _tensor_json(name: str, datatype: str, data: list[Any], shape: list[int]) -> dict[str, Any]:
    return {"name": name, "shape": shape, "datatype": datatype, "data": data}


WIDE = 4096  # the "big" model's width: a tensor over the size searched for booleans outright
WIDE_ROW = (np.arange(WIDE, dtype=np.float32) / 8).tolist()


class TestJsonBooleans:
    """As Triton: JSON true and false are data for a BOOL tensor only; among numbers they are a 400
    naming the input, where NumPy read them as 1 and 0."""

    @pytest.mark.parametrize("datatype", [d for d in NUMERIC if d != "BOOL"])
    @pytest.mark.parametrize("value", [True, False])
    def test_a_boolean_among_numbers_is_400(self, http: httpx.Client, datatype: str, value: bool) -> None:
        """A small tensor of any number datatype, flat or nested, with one boolean among its numbers."""
        first = 1.5 if datatype.startswith("FP") else 1
        for data, shape in (([first, value], [1, 2]), ([[first, 2], [3, value]], [2, 2])):
            response = _infer(http, "echo", _ji("v", datatype, data, shape))
            assert response.status_code == 400, response.text
            assert response.json()["error"] == _bools_message(datatype, "v")
        _decode(_infer(http, "echo", _ji("v", datatype, [first, 2], [1, 2])))  # numbers alone are fine

    @pytest.mark.parametrize("value", [True, False])
    @pytest.mark.parametrize(
        "dumps",
        [
            pytest.param(lambda body: json.dumps(body, separators=(",", ":")).encode(), id="compact"),
            pytest.param(lambda body: json.dumps(body).encode(), id="spaced"),
            pytest.param(lambda body: json.dumps(body, indent=2).encode(), id="indented"),
            pytest.param(
                lambda body: re.sub(r", (true|false)", "," + " " * 100 + r"\1", json.dumps(body)).encode(),
                id="100 spaces before",
            ),
        ],
    )
    def test_a_boolean_in_a_large_tensor_is_400(
        self, http: httpx.Client, value: bool, dumps: Callable[[dict[str, Any]], bytes]
    ) -> None:
        """A large tensor (searched only where the JSON text has room for a boolean in an array) with one
        boolean, flat or nested, next to what tritonclient sends: booleans as parameters."""
        outputs = [{"name": "y", "parameters": {"binary_data": False}}]
        for data in ([*WIDE_ROW[:-1], value], [[*WIDE_ROW[:100], value, *WIDE_ROW[101:]]]):
            inputs = [_tensor_json("x", "FP32", data, [1, WIDE])]
            body = dumps({"inputs": inputs, "outputs": outputs, "parameters": {"binary_data_output": True}})
            response = _infer(http, "big", body)
            assert response.status_code == 400, response.text
            assert response.json()["error"] == _bools_message("FP32", "x")

    def test_large_tensors_beside_booleans_elsewhere_are_served(self, http: httpx.Client) -> None:
        """Booleans as parameters, in a BOOL tensor, inside a BYTES string or in binary data do not
        refuse a large number tensor without one; one with a boolean is refused beside them, and beside
        text too long to look through."""
        row = np.array([WIDE_ROW], np.float32)
        parameters = {"binary_data": False, "flags": True}
        body = json.dumps(
            {
                "inputs": [_tensor_json("x", "FP32", WIDE_ROW, [1, WIDE])],
                "outputs": [{"name": "y", "parameters": parameters}],
                "parameters": {"binary_data_output": False},
            }
        ).encode()
        np.testing.assert_array_equal(_decode(_infer(http, "big", body))[1]["y"], row)

        flags = _tensor_json("b", "BOOL", [[True, False, True]], [1, 3])
        words = ["[true, false]", ",true", "lull " * 1000]  # "u" and "l": more than worth looking at
        text = _tensor_json("t", "BYTES", words, [1, 3])
        for numbers in ([WIDE_ROW], [[1] * 100]):
            datatype = "FP32" if isinstance(numbers[0][0], float) else "INT64"
            wide = _tensor_json("x", datatype, numbers, [1, len(numbers[0])])
            _, out = _decode(_infer(http, "echo", json.dumps({"inputs": [flags, text, wide]}).encode()))
            np.testing.assert_array_equal(out["b_out"], [[True, False, True]])
            assert out["t_out"].tolist() == [[w.encode() for w in words]]
            np.testing.assert_array_equal(out["x_out"], numbers)
            bad = _tensor_json("x", datatype, [[*numbers[0][:-1], False]], [1, len(numbers[0])])
            response = _infer(http, "echo", json.dumps({"inputs": [flags, text, bad]}).encode())
            assert response.status_code == 400, response.text
            assert response.json()["error"] == _bools_message(datatype, "x")

        raw = b"[true,false,"  # binary data is not JSON: its bytes are never read as booleans
        tensors = [
            _tensor_json("x", "FP32", [WIDE_ROW[:100]], [1, 100]),
            {"name": "r", "shape": [1, len(raw)], "datatype": "UINT8", "parameters": {"binary_data_size": len(raw)}},
        ]
        body, headers = _header({"inputs": tensors}, raw)
        _, out = _decode(_infer(http, "echo", body, headers))
        assert out["r_out"].tobytes() == raw
        np.testing.assert_array_equal(out["x_out"], [WIDE_ROW[:100]])

    @pytest.mark.parametrize(
        ("text", "found"),
        [
            pytest.param(
                b'{"inputs":[{"name":"x","data":[1.0,2.5]}],"outputs":[{"parameters":{"binary_data":false}}]}',
                False,
                id="tritonclient's: a boolean as an object's value",
            ),
            pytest.param(
                b'{"inputs": [{"data": [1, 2]}], "parameters": {"binary_data_output" :\n true}}',
                False,
                id="a value after whitespace",
            ),
            pytest.param(
                b'{"inputs":[{"name":"input_ids","data":[NaN,Infinity,-Infinity,1e-05]}],"id":"untrue or falsely"}',
                False,
                id="words in strings",
            ),
            pytest.param(b"true", False, id="not in an array"),
            pytest.param(b"[true]", True, id="first"),
            pytest.param(b"[1,false]", True, id="after a comma"),
            pytest.param(b"[1, \t\r\n true]", True, id="after whitespace"),
            pytest.param(b"[[1],\n[false]]", True, id="nested"),
            pytest.param(b"[1," + b" " * 100 + b"true]", True, id="unsure past 64 bytes of whitespace"),
            pytest.param(b'["a", "b,true"]', True, id="in a string, with room for one"),
            pytest.param(
                b'{"id":"' + b"lulu" * 100 + b'","data":[1]}', True, id="unsure past the limit of letters to look at"
            ),
        ],
    )
    def test_where_the_json_text_has_room_for_a_boolean_in_an_array(self, text: bytes, found: bool) -> None:
        """The search that spares large tensors a pass: false only where no array holds a boolean."""
        assert _array_bools(text, len(text), 256) is found
        assert _array_bools(bytearray(text) + b"[true]", len(text), 256) is found  # past ``end``: binary data

    def test_bool_tensors_take_true_and_false(self, http: httpx.Client) -> None:
        """A BOOL tensor takes JSON true and false, flat or nested, small or large, and only them."""
        for data, shape in (([True, False], [1, 2]), ([[True], [False]], [2, 1]), ([True, False] * 100, [1, 200])):
            header, out = _decode(_infer(http, "echo", _ji("v", "BOOL", data, shape)))
            assert header["outputs"][0]["datatype"] == "BOOL"
            np.testing.assert_array_equal(out["output"], np.array(data, bool).reshape(shape))
        response = _infer(http, "echo", _ji("v", "BOOL", [True, 1], [1, 2]))
        assert response.status_code == 400
        assert "input 'v': BOOL data cannot hold" in response.json()["error"]


class TestInferBinary:
    """The binary tensor data extension."""

    def test_fp32_binary_in_and_out(self, http: httpx.Client) -> None:
        """Binary input, binary output with binary_data_output."""
        x = _x(5)
        body, headers = _binary_body({"x": x}, parameters={"binary_data_output": True})
        response = _infer(http, "mlp", body, headers)
        assert response.headers["content-type"] == "application/octet-stream"
        header, out = _decode(response)
        assert header["outputs"][0]["parameters"]["binary_data_size"] == 5 * 3 * 4
        np.testing.assert_allclose(out["y"], x @ W + B, rtol=1e-6)

    def test_mixed_binary_and_json_inputs(self, http: httpx.Client) -> None:
        """One input binary and one JSON: offsets count only the binary ones."""
        a = np.arange(6, dtype=np.int64).reshape(2, 3)
        b = -np.arange(6, dtype=np.int64).reshape(2, 3) * 5
        raw = a.tobytes()
        tensors = [
            {"name": "b", **_json_input("b", b)},
            {"name": "a", "shape": [2, 3], "datatype": "INT64", "parameters": {"binary_data_size": len(raw)}},
        ]
        header = json.dumps({"inputs": tensors}).encode()
        _, out = _decode(_infer(http, "ints", header + raw, {HEADER_LENGTH: str(len(header))}))
        np.testing.assert_array_equal(out["sum"], a + b)

    def test_bytes_binary(self, http: httpx.Client) -> None:
        """BYTES framed with 4-byte lengths, including bytes that are not UTF-8."""
        text = np.array([b"abc", b"\xff\xfe", b""], dtype=object)
        body, headers = _binary_body({"text": text}, parameters={"binary_data_output": True})
        _, out = _decode(_infer(http, "text", body, headers))
        assert list(out["upper"]) == [b"ABC", b"\xff\xfe", b""]

    def test_non_utf8_bytes_output_goes_binary_even_when_json_was_asked(self, http: httpx.Client) -> None:
        """JSON cannot carry bytes that are not UTF-8, so that one output is sent binary."""
        body, headers = _binary_body({"text": np.array([b"\xff"], dtype=object)})
        header, out = _decode(_infer(http, "text", body, headers))
        kinds = {t["name"]: ("data" in t) for t in header["outputs"]}
        assert kinds == {"upper": False, "length": True}
        assert list(out["upper"]) == [b"\xff"]

    def test_per_output_binary_flag(self, http: httpx.Client) -> None:
        """``parameters.binary_data`` on one output makes only that one binary."""
        outputs = [
            {"name": "y", "parameters": {"binary_data": True}},
            {"name": "s", "parameters": {"binary_data": False}},
        ]
        header, out = _decode(_infer(http, "two", _json_body({"x": _x(2)}, outputs=outputs)))
        assert "parameters" in header["outputs"][0]
        assert "data" in header["outputs"][1]
        np.testing.assert_allclose(out["y"], _x(2) * 2)

    def test_every_datatype(self, http: httpx.Client) -> None:
        """Each numeric datatype survives a binary round trip exactly."""
        for arr in _every_dtype().values():
            body, headers = _binary_body({"v": arr}, parameters={"binary_data_output": True})
            _, out = _decode(_infer(http, "echo", body, headers))
            np.testing.assert_array_equal(out["output"], arr)  # one output of an untyped model

    def test_gzip_body(self, http: httpx.Client) -> None:
        """A gzip-encoded body (tritonclient's request compression) is inflated first."""
        body, headers = _binary_body({"x": _x()})
        response = _infer(http, "mlp", gzip.compress(body), {**headers, "Content-Encoding": "gzip"})
        np.testing.assert_allclose(_decode(response)[1]["y"], _x() @ W + B, rtol=1e-6)
        members = gzip.compress(body[:10]) + gzip.compress(body[10:])  # RFC 1952: members, one after another
        response = _infer(http, "mlp", members, {**headers, "Content-Encoding": "gzip"})
        np.testing.assert_allclose(_decode(response)[1]["y"], _x() @ W + B, rtol=1e-6)

    def test_a_header_given_twice_with_different_values_is_400(self, http: httpx.Client) -> None:
        """Two Inference-Header-Content-Length or Content-Encoding values that differ: 400 in either order (a
        proxy reading the other one would see another request); the same value twice is fine."""
        body, headers = _binary_body({"x": _x()})
        length = headers[HEADER_LENGTH]
        for values in ([length, "3"], ["3", length]):
            dup = [(k, v) for k, v in headers.items() if k != HEADER_LENGTH] + [(HEADER_LENGTH, v) for v in values]
            response = http.post("/v2/models/mlp/infer", content=body, headers=dup)
            assert response.status_code == 400, response.text
            assert "given 2 times with different values" in response.json()["error"]
        for values in (["identity", "gzip"], ["gzip", "identity"]):
            dup = [*headers.items(), *(("Content-Encoding", v) for v in values)]
            response = http.post("/v2/models/mlp/infer", content=gzip.compress(body), headers=dup)
            assert response.status_code == 400, response.text
        same = [*headers.items(), (HEADER_LENGTH, length)]
        response = http.post("/v2/models/mlp/infer", content=body, headers=same)
        np.testing.assert_allclose(_decode(response)[1]["y"], _x() @ W + B, rtol=1e-6)


class TestTritonClient:
    """tritonclient.http, with its default (binary) settings, against the real server."""

    def test_health_and_metadata(self, triton_client: triton.InferenceServerClient) -> None:
        """The client's health and metadata calls."""
        assert triton_client.is_server_live()
        assert triton_client.is_server_ready()
        assert triton_client.is_model_ready("mlp")
        assert not triton_client.is_model_ready("nope")
        assert triton_client.get_model_metadata("mlp")["inputs"][0]["shape"] == [-1, 4]
        assert triton_client.get_server_metadata()["name"] == "inferkit"

    def test_fp32(self, triton_client: triton.InferenceServerClient) -> None:
        """FP32 in and out, binary both ways, with a request id."""
        x = _x(4)
        tensor = triton.InferInput("x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result = triton_client.infer("mlp", [tensor], request_id="abc")
        np.testing.assert_allclose(result.as_numpy("y"), x @ W + B, rtol=1e-6)
        assert result.get_response()["id"] == "abc"

    def test_int64_bytes_and_json_inputs(self, triton_client: triton.InferenceServerClient) -> None:
        """INT64 with one binary and one JSON input; BYTES both ways."""
        a = np.arange(6, dtype=np.int64).reshape(2, 3)
        ta, tb = triton.InferInput("a", [2, 3], "INT64"), triton.InferInput("b", [2, 3], "INT64")
        ta.set_data_from_numpy(a)
        tb.set_data_from_numpy(a * 10, binary_data=False)
        np.testing.assert_array_equal(triton_client.infer("ints", [ta, tb]).as_numpy("sum"), a * 11)
        for binary in (True, False):
            text = np.array([b"ab", b"cd e"], dtype=object)
            tt = triton.InferInput("text", [2], "BYTES")
            tt.set_data_from_numpy(text, binary_data=binary)
            result = triton_client.infer("text", [tt])
            assert list(result.as_numpy("upper")) == [b"AB", b"CD E"]
            np.testing.assert_array_equal(result.as_numpy("length"), [2, 4])

    def test_requested_outputs(self, triton_client: triton.InferenceServerClient) -> None:
        """Requested outputs, one binary and one JSON."""
        x = _x(3)
        tensor = triton.InferInput("x", [3, 4], "FP32")
        tensor.set_data_from_numpy(x)
        outputs = [triton.InferRequestedOutput("s", binary_data=False), triton.InferRequestedOutput("y")]
        result = triton_client.infer("two", [tensor], outputs=outputs)
        np.testing.assert_allclose(result.as_numpy("s"), x.sum(axis=1), rtol=1e-6)
        np.testing.assert_allclose(result.as_numpy("y"), x * 2)
        assert [o["name"] for o in result.get_response()["outputs"]] == ["s", "y"]

    def test_16_mb_tensor(self, triton_client: triton.InferenceServerClient) -> None:
        """A 16 MB FP32 tensor goes in and comes back out intact."""
        x = np.random.default_rng(1).standard_normal((1024, 4096)).astype(np.float32)
        assert x.nbytes == 16 * 2**20
        tensor = triton.InferInput("x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        np.testing.assert_array_equal(triton_client.infer("big", [tensor]).as_numpy("y"), x)

    def test_versions_key_and_stats(self, triton_client: triton.InferenceServerClient) -> None:
        """A pinned version, a sticky key in a header, and the statistics call."""
        x = _x(1)
        tensor = triton.InferInput("x", [1, 4], "FP32")
        tensor.set_data_from_numpy(x)
        pinned = triton_client.infer("clf", [tensor], model_version="2")
        np.testing.assert_allclose(pinned.as_numpy("y"), x * 3)
        arms = {
            triton_client.infer("clf", [tensor], headers={"inferkit-key": "u1"}).get_response()["parameters"]["arm"]
            for _ in range(3)
        }
        assert len(arms) == 1
        stats = triton_client.get_inference_statistics("clf")
        assert [s["version"] for s in stats["model_stats"]] == ["", "1", "2"]

    def test_errors(self, triton_client: triton.InferenceServerClient) -> None:
        """Errors arrive as InferenceServerException with the status and the message."""
        tensor = triton.InferInput("x", [1, 5], "FP32")
        tensor.set_data_from_numpy(np.zeros((1, 5), np.float32))
        with pytest.raises(InferenceServerException) as bad:
            triton_client.infer("mlp", [tensor])
        assert bad.value.status() == "400"
        assert "'x'" in bad.value.message()
        with pytest.raises(InferenceServerException) as missing:
            triton_client.infer("nope", [tensor])
        assert missing.value.status() == "404"


class TestRouting:
    """A Router behind the REST face: sticky keys, the served arm, pinned versions."""

    def test_key_header_picks_a_sticky_arm_and_reports_it(self, http: httpx.Client) -> None:
        """The arm is in the header and the parameters; one key stays on one arm."""
        x = _x(2)
        seen = {}
        for i in range(40):
            key = f"user-{i}"
            response = _infer(http, "clf", _json_body({"x": x}), {"inferkit-key": key})
            header, out = _decode(response)
            arm = response.headers["inferkit-arm"]
            assert header["parameters"] == {"arm": arm}
            np.testing.assert_allclose(out["y"], x * (2.0 if arm == "1" else 3.0))
            again = _infer(http, "clf", _json_body({"x": x}), {"inferkit-key": key})
            assert again.headers["inferkit-arm"] == arm
            seen[key] = arm
        assert set(seen.values()) == {"1", "2"}

    def test_key_parameter_matches_the_header(self, http: httpx.Client) -> None:
        """``parameters.key`` routes like the same key in the header."""
        for i in range(10):
            by_header = _infer(http, "clf", _json_body({"x": _x()}), {"inferkit-key": str(i)})
            by_param = _infer(http, "clf", _json_body({"x": _x()}, parameters={"key": i}))
            assert by_header.headers["inferkit-arm"] == by_param.headers["inferkit-arm"]

    def test_version_pins_and_reports_no_arm(self, http: httpx.Client) -> None:
        """``/versions/{v}`` runs that version whatever the key; no Router, no arm."""
        for version, k in (("1", 2.0), ("2", 3.0)):
            for key in ("a", "b", "c"):
                response = http.post(
                    f"/v2/models/clf/versions/{version}/infer",
                    content=_json_body({"x": _x()}),
                    headers={"inferkit-key": key},
                )
                header, out = _decode(response)
                np.testing.assert_allclose(out["y"], _x() * k)
                assert header["model_version"] == version
                assert "inferkit-arm" not in response.headers
                assert "parameters" not in header


def _good() -> bytes:
    return _json_body({"x": _x(2)})


def _header(body: dict[str, Any], raw: bytes = b"", length: int | None = None) -> tuple[bytes, dict[str, str]]:
    header = json.dumps(body).encode()
    return header + raw, {HEADER_LENGTH: str(len(header) if length is None else length)}


_X = {"name": "x", "shape": [1, 4], "datatype": "FP32"}
_BINX = {**_X, "parameters": {"binary_data_size": 16}}
_DROP = object()


def _j(tensor: dict[str, Any] | None = None, **top: Any) -> bytes:
    """A JSON body: one input (``_X`` with four values, updated by ``tensor``) and top-level fields."""
    merged = {**_X, "data": [1] * 4, **(tensor or {})}
    return json.dumps({"inputs": [{k: v for k, v in merged.items() if v is not _DROP}], **top}).encode()


def _ji(name: str, datatype: str, data: list[Any], shape: list[int] | None = None) -> bytes:
    """A JSON body with one input of any name and datatype."""
    shape = [len(data)] if shape is None else shape
    return json.dumps({"inputs": [{"name": name, "shape": shape, "datatype": datatype, "data": data}]}).encode()


def _bytes_input(size: int, count: int) -> dict[str, Any]:
    return {"name": "text", "shape": [count], "datatype": "BYTES", "parameters": {"binary_data_size": size}}


MALFORMED: list[tuple[str, str, bytes, dict[str, str], str]] = [
    ("mlp", "not json", b"{nope", {}, "not valid JSON"),
    ("mlp", "not utf-8", b"\xff\xfe{}", {}, "not valid JSON"),
    ("mlp", "deep nesting", b"[" * 100_000 + b"]" * 100_000, {}, "not valid JSON"),
    ("mlp", "a list", b"[]", {}, "JSON object"),
    ("mlp", "no inputs", b"{}", {}, "non-empty list of inputs"),
    ("mlp", "inputs not a list", b'{"inputs": 3}', {}, "list of inputs"),
    ("mlp", "input not an object", b'{"inputs": [3]}', {}, "JSON object"),
    ("mlp", "no name", _j({"name": _DROP}), {}, "name"),
    ("mlp", "bad shape", _j({"shape": "1,4"}), {}, "shape"),
    ("mlp", "negative dim", _j({"shape": [-1, 4]}), {}, "shape"),
    ("mlp", "bool dim", _j({"shape": [True, 4]}), {}, "shape"),
    ("mlp", "70 dimensions, JSON", _j({"shape": [1] * 69 + [4]}), {}, "maximum supported dimension"),
    (
        "mlp",
        "70 dimensions, binary",
        *_header({"inputs": [{**_BINX, "shape": [1] * 69 + [4]}]}, b"\0" * 16),
        "maximum supported dimension",
    ),
    ("text", "70 dimensions, BYTES", _ji("text", "BYTES", ["a"], [1] * 70), {}, "maximum supported dimension"),
    ("mlp", "shape vs data", _j({"data": [1, 2, 3]}), {}, "needs 4 elements"),
    ("mlp", "huge shape", _j({"shape": [2**62, 2**62]}), {}, "elements"),
    ("mlp", "ragged", _j({"data": [[1, 2], [3]]}), {}, "regular array"),
    ("mlp", "strings for FP32", _j({"data": ["1", "2", "3", "4"]}), {}, "strings"),
    # NumPy read them as 1 and 0; Triton refuses them
    ("mlp", "true among FP32", _j({"data": [1, 2, True, 4]}), {}, "input 'x': FP32 data cannot hold booleans"),
    ("ints", "false among INT64", _ji("a", "INT64", [1, False, 3], [1, 3]), {}, "INT64 data cannot hold booleans"),
    ("mlp", "null data", _j({"data": None}), {}, "JSON list"),
    ("mlp", "no data", _j({"data": _DROP}), {}, "neither data"),
    ("mlp", "FP16 overflow", _j({"datatype": "FP16", "data": [1e6] * 4}), {}, "overflow"),
    ("mlp", "unknown datatype", _j({"datatype": "FP8"}), {}, "datatype"),
    ("mlp", "wrong datatype", _j({"datatype": "INT64"}), {}, "data-type is 'INT64', but model 'mlp' expects 'FP32'"),
    ("mlp", "wrong shape", _j({"shape": [1, 3], "data": [1] * 3}), {}, "shape"),
    ("mlp", "empty batch", _j({"shape": [0, 4], "data": []}), {}, "empty batch"),
    ("mlp", "unknown input", _j({"name": "z"}), {}, "'z'"),
    ("mlp", "input twice", json.dumps({"inputs": [{**_X, "data": [1] * 4}] * 2}).encode(), {}, "twice"),
    ("ints", "missing input", _ji("a", "INT64", [1] * 3, [1, 3]), {}, "missing input 'b'"),
    ("ints", "float for INT64", _ji("a", "INT64", [1.5]), {}, "must be integers, got 1.5"),
    ("ints", "null for INT64", _ji("a", "INT64", [1, None]), {}, "must be integers, got None"),
    ("ints", "INT8 out of range", _ji("a", "INT8", [300]), {}, "do not fit"),
    # orjson reads 2**70 as a float, the stdlib as an int: a 400 naming the input either way
    ("ints", "beyond UINT64", _ji("a", "UINT64", [2**70, 1]), {}, "input 'a': UINT64"),
    ("text", "number for BYTES", _ji("text", "BYTES", [1]), {}, "strings"),
    # the stdlib's JSON (read when a body holds NaN) takes a lone surrogate, which has no UTF-8: was a 500
    ("text", "lone surrogate", _ji("text", "BYTES", ["\ud800"])[:-1] + b', "id": "NaN"}', {}, "not valid Unicode"),
    # an int past a float's range (read by the stdlib's JSON, when the body holds NaN) was a 500: none
    ("mlp", "huge timeout", _j(parameters={"timeout": 10**400, "priority": -1}, id="NaN"), {}, "priority"),
    ("mlp", "FP64 for FP32", _j({"datatype": "FP64", "data": [1e-50] * 4}), {}, "data-type is 'FP64'"),
    ("mlp", "bad id", _j(id=5), {}, "id must be a string"),
    ("mlp", "bad parameters", _j(parameters=[]), {}, "parameters"),
    ("mlp", "bad timeout", _j(parameters={"timeout": "soon"}), {}, "timeout"),
    ("mlp", "negative timeout", _j(parameters={"timeout": -1}), {}, "timeout"),
    ("mlp", "bad priority", _j(parameters={"priority": 1.5}), {}, "priority"),
    ("mlp", "bad key", _j(parameters={"key": [1]}), {}, "key"),
    ("mlp", "bad binary_data_output", _j(parameters={"binary_data_output": 1}), {}, "binary_data_output"),
    ("mlp", "unknown output", _j(outputs=[{"name": "q"}]), {}, "unexpected inference output 'q' for model 'mlp'"),
    ("mlp", "outputs not a list", _j(outputs="y"), {}, "outputs"),
    ("mlp", "class_count", _j(outputs=[{"name": "y", "parameters": {"class_count": 2}}]), {}, "classification"),
    # what tritonclient.http sends for InferRequestedOutput(..., class_count=2)
    ("mlp", "classification", _j(outputs=[{"name": "y", "parameters": {"classification": 2}}]), {}, "classification"),
    ("mlp", "shared memory", _j({"data": _DROP, "parameters": {"shared_memory_region": "r"}}), {}, "shared memory"),
    ("mlp", "truncated binary", *_header({"inputs": [_BINX]}, b"\0" * 10), "only 10 remain"),
    ("mlp", "extra binary", *_header({"inputs": [_BINX]}, b"\0" * 20), "4 bytes after"),
    ("mlp", "size vs shape", *_header({"inputs": [{**_X, "parameters": {"binary_data_size": 12}}]}, b"\0" * 12), "16"),
    ("mlp", "negative size", *_header({"inputs": [{**_X, "parameters": {"binary_data_size": -4}}]}), "binary_data"),
    ("mlp", "data and size", *_header({"inputs": [{**_BINX, "data": [1] * 4}]}, b"\0" * 16), "both"),
    ("mlp", "header length past body", *_header({"inputs": [_BINX]}, b"\0" * 16, length=10**6), HEADER_LENGTH),
    ("mlp", "header length short", *_header({"inputs": [_BINX]}, b"\0" * 16, length=5), "not valid JSON"),
    ("mlp", "header length not a number", _good(), {HEADER_LENGTH: "ten"}, HEADER_LENGTH),
    # str.isdigit() took these; int() then raised: a 500 before
    (
        "mlp",
        "header length a non-ASCII digit",
        _good(),
        {HEADER_LENGTH: b"\xb2"},
        HEADER_LENGTH,
    ),  # a latin-1 superscript two
    ("mlp", "header length of 5,000 digits", _good(), {HEADER_LENGTH: "1" * 5000}, HEADER_LENGTH),
    ("mlp", "binary without header length", _header({"inputs": [_BINX]}, b"\0" * 16)[0], {}, "not valid JSON"),
    ("text", "BYTES truncated", *_header({"inputs": [_bytes_input(9, 2)]}, b"\x03\0\0\0abc\x09\0"), "ends after 1"),
    ("text", "BYTES length lies", *_header({"inputs": [_bytes_input(6, 1)]}, b"\xff\0\0\0ab"), "claims 255"),
    ("text", "BYTES count lies", *_header({"inputs": [_bytes_input(4, 2**40)]}, b"\0" * 4), "cannot hold"),
    (
        "echo",
        "BOOL bytes not 0/1",
        *_header(
            {"inputs": [{"name": "b", "shape": [2], "datatype": "BOOL", "parameters": {"binary_data_size": 2}}]},
            b"\x01\x02",
        ),
        "BOOL data must be bytes 0 or 1",
    ),
    ("mlp", "bad gzip", b"not gzip", {"Content-Encoding": "gzip"}, "decompress"),
    ("mlp", "truncated gzip", gzip.compress(_good())[:-12], {"Content-Encoding": "gzip"}, "truncated"),
    ("mlp", "junk after gzip", gzip.compress(_good()) + b"junk", {"Content-Encoding": "gzip"}, "decompress"),
    ("mlp", "bytes after deflate", zlib.compress(_good()) + b"x", {"Content-Encoding": "deflate"}, "after the deflate"),
    ("mlp", "65 gzip members", gzip.compress(_good()) + gzip.compress(b"") * 64, {"Content-Encoding": "gzip"}, "64"),
]


class TestMalformedRequests:
    """Every malformed request is a 4xx with a clear message, and the server goes on serving."""

    @pytest.mark.parametrize(
        ("model", "body", "headers", "message"),
        [pytest.param(m, b, h, msg, id=label) for m, label, b, h, msg in MALFORMED],
    )
    def test_rejected_with_400(
        self, http: httpx.Client, model: str, body: bytes, headers: dict[str, str], message: str
    ) -> None:
        """A 400 whose message says what was wrong; then a good request still succeeds."""
        response = _infer(http, model, body, headers)
        assert response.status_code == 400, response.text
        assert message in response.json()["error"]
        _decode(_infer(http, "mlp", _good()))

    def test_unknown_output_is_refused_before_the_model_runs(self, http: httpx.Client, repository: Repository) -> None:
        """With a signature to check against, an unknown output costs no model call."""
        target = repository.model("mlp").target
        assert isinstance(target, Predictor)
        before = target.stats().accepted
        response = _infer(http, "mlp", _j(outputs=[{"name": "y"}, {"name": "q"}]))
        assert response.status_code == 400
        assert "unexpected inference output 'q'" in response.json()["error"]
        assert target.stats().accepted == before

    def test_unknown_model_and_version(self, http: httpx.Client) -> None:
        """404 for an unknown model or version, before the body is read."""
        assert _infer(http, "nope", _good()).status_code == 404
        response = http.post("/v2/models/clf/versions/7/infer", content=_good())
        assert response.status_code == 404
        assert response.json()["error"].startswith("Request for unknown model: 'clf' version 7 is not found")

    def test_unsupported_encoding_is_415(self, http: httpx.Client) -> None:
        """A Content-Encoding other than gzip, deflate or identity is a 415."""
        response = _infer(http, "mlp", _good(), {"Content-Encoding": "br"})
        assert response.status_code == 415
        assert "br" in response.json()["error"]

    def test_huge_bodies_are_413(self) -> None:
        """Over max_request_bytes by Content-Length, by a chunked stream, or once inflated: 413."""
        repository = Repository({"m": _scale(1.0, "m", width=256)})
        server = Server(create_app(repository, max_request_bytes=2**16))
        try:
            with httpx.Client(base_url=server.url, timeout=WAIT) as http:
                good = _json_body({"x": np.ones((4, 256), np.float32)})
                big = _json_body({"x": np.ones((64, 256), np.float32)})
                assert len(good) < 2**16 < len(big)
                response = _infer(http, "m", big)
                assert response.status_code == 413
                assert "max_request_bytes=65536" in response.json()["error"]

                def chunks() -> Iterator[bytes]:
                    for i in range(0, len(big), 4096):
                        yield big[i : i + 4096]

                assert http.post("/v2/models/m/infer", content=chunks()).status_code == 413
                bomb = gzip.compress(b" " * 2**20)
                assert _infer(http, "m", bomb, {"Content-Encoding": "gzip"}).status_code == 413
                assert _infer(http, "m", good).status_code == 200
        finally:
            server.stop()
            repository.close()


class TestDecodingLimits:
    """JSON bodies, concurrent decoding and encoding are bounded in bytes; claims cost no work."""

    def test_a_json_body_over_max_json_bytes_is_413_and_binary_is_not(self) -> None:
        """The JSON limit names itself and says to send binary; the same tensor in binary is served."""
        repository = Repository({"m": _scale(1.0, "m", width=256)})
        server = Server(create_app(repository, max_json_bytes=2**16))
        try:
            with httpx.Client(base_url=server.url, timeout=WAIT) as http:
                x = np.ones((64, 256), np.float32)
                response = _infer(http, "m", _json_body({"x": x}))
                assert response.status_code == 413
                assert "max_json_bytes=65536" in response.json()["error"]
                assert "binary" in response.json()["error"]
                body, headers = _binary_body({"x": x})
                assert len(body) > 2**16
                np.testing.assert_array_equal(_decode(_infer(http, "m", body, headers))[1]["y"], x)
                response = _infer(http, "m", *_header({"inputs": [_BINX]}, b"\0" * 16, length=2**16 + 1))
                assert response.status_code == 413  # a header length past the limit: refused before reading
        finally:
            server.stop()
            repository.close()

    def test_a_body_that_can_never_be_decoded_within_the_budget_is_413(self) -> None:
        """Over max_decode_bytes on its own: 413 naming the limit; small bodies skip the budget."""
        repository = Repository({"m": _scale(1.0, "m", width=256)})
        server = Server(create_app(repository, max_decode_bytes=2**20))
        try:
            with httpx.Client(base_url=server.url, timeout=WAIT) as http:
                big = _json_body({"x": np.ones((1024, 256), np.float32)})
                response = _infer(http, "m", big)
                assert response.status_code == 413
                assert "max_decode_bytes=1048576" in response.json()["error"]
                assert _infer(http, "m", _json_body({"x": np.ones((4, 256), np.float32)})).status_code == 200
                medium = _json_body({"x": np.ones((64, 256), np.float32)})  # 32 KiB to 1 MiB: off the loop, budgeted
                assert 2**15 < len(medium) < 2**20
                assert len(medium) * 32 > 2**20
                assert _infer(http, "m", medium).status_code == 413
        finally:
            server.stop()
            repository.close()

    def test_a_busy_budget_refuses_with_the_overload_status_and_is_given_back(self) -> None:
        """Two large bodies, room for one: one waits for a thread holding the budget, the other gets 429."""
        import anyio.to_thread

        repository = Repository({"m": _scale(1.0, "m", width=256)})
        x = np.ones((1024, 256), np.float32)
        body, headers = _binary_body({"x": x}, parameters={"binary_data_output": True})  # 2 MiB of budget
        app = create_app(repository, max_decode_bytes=3 * 2**20, overload_status=429, retry_after_s=2)
        gate = threading.Event()

        async def scenario(client: httpx.AsyncClient) -> None:
            loop, started = asyncio.get_running_loop(), asyncio.Event()

            def blocker() -> None:  # holds the only worker thread, so a decode waits holding its budget
                loop.call_soon_threadsafe(started.set)
                assert gate.wait(WAIT)

            anyio.to_thread.current_default_thread_limiter().total_tokens = 1
            blocked = asyncio.ensure_future(anyio.to_thread.run_sync(blocker))
            await asyncio.wait_for(started.wait(), WAIT)
            posts = [
                asyncio.ensure_future(client.post("/v2/models/m/infer", content=body, headers=headers))
                for _ in range(2)
            ]
            try:
                done, _ = await asyncio.wait(posts, timeout=WAIT, return_when=asyncio.FIRST_COMPLETED)
                refused = done.pop().result()
                assert refused.status_code == 429
                assert refused.headers["Retry-After"] == "2"
                assert "max_decode_bytes" in refused.json()["error"]
            finally:
                gate.set()
                await blocked
            statuses = sorted(r.status_code for r in await asyncio.gather(*posts))
            assert statuses == [200, 429]
            for _ in range(3):  # every hold was given back, also by the refused request
                response = await client.post("/v2/models/m/infer", content=body, headers=headers)
                np.testing.assert_array_equal(_decode(response)[1]["y"], x)

        try:
            _run_in_process(app, scenario)
        finally:
            repository.close()

    def test_failed_decodes_give_the_budget_back(self) -> None:
        """Large malformed bodies are 400 one after another, never 503: a failing decode releases its hold."""
        repository = Repository({"m": _scale(1.0, "m", width=256)})
        app = create_app(repository, max_request_bytes=16 * 2**20, max_decode_bytes=64 * 2**20)
        server = Server(app)
        try:
            with httpx.Client(base_url=server.url, timeout=WAIT) as http:
                bad = _json_body({"x": np.ones((1024, 256), np.float32)})[:-3] + b"]]}"  # 1.3 MB, 42 MB held
                for _ in range(5):
                    assert _infer(http, "m", bad).status_code == 400
                bomb = gzip.compress(b" " * (3 * 2**19))  # inflated on a thread, under a hold of 16 MiB
                for _ in range(3):
                    assert _infer(http, "m", bomb, {"Content-Encoding": "gzip"}).status_code == 400
                good = gzip.compress(_json_body({"x": np.ones((1024, 256), np.float32)}))
                assert _infer(http, "m", good, {"Content-Encoding": "gzip"}).status_code == 200
        finally:
            server.stop()
            repository.close()

    def test_an_answer_too_large_to_encode_as_json_is_413_and_binary_is_served(self) -> None:
        """Encoding is budgeted too: JSON outputs cost a Python object per element; binary ones do not."""
        repository = Repository({"m": _scale(1.0, "m", width=4096, max_batch_size=256)})
        server = Server(create_app(repository, max_decode_bytes=32 * 2**20))
        try:
            with httpx.Client(base_url=server.url, timeout=WAIT) as http:
                x = np.ones((256, 4096), np.float32)
                body, headers = _binary_body({"x": x})
                response = _infer(http, "m", body, headers)
                assert response.status_code == 413
                assert "binary_data_output" in response.json()["error"]
                body, headers = _binary_body({"x": x}, parameters={"binary_data_output": True})
                np.testing.assert_array_equal(_decode(_infer(http, "m", body, headers))[1]["y"], x)
        finally:
            server.stop()
            repository.close()

    @pytest.mark.parametrize(
        ("label", "body", "message"),
        [
            # the product of 200,000 dimensions of 2**62 took minutes on the event loop
            ("many huge dims", _j({"shape": [2**62] * 200_000, "data": []}), "maximum supported dimension"),
            ("a dim past int64", _j({"shape": [2**63, 0], "data": []}), "[0, 2**63)"),
            # a repeat was looked for in a list: 200,000 outputs took minutes
            (
                "many outputs",
                _j(outputs=[{"name": f"o{i}"} for i in range(200_000)]),
                "unexpected inference output 'o0'",
            ),
        ],
    )
    def test_claims_cost_no_work(self, http: httpx.Client, label: str, body: bytes, message: str) -> None:
        """A claim in the JSON header (dimensions, outputs) is refused in time linear in its text."""
        response = _infer(http, "mlp", body)
        assert response.status_code == 400, label
        assert message in response.json()["error"]
        assert len(response.content) < 1000  # the error quotes the claim, bounded
        _decode(_infer(http, "mlp", _good()))


# -- overload, deadlines, failures, disconnects --------------------------------------------


class Gate:
    """A model ``y = 2 x`` that waits for ``release`` when a row starts with -1 and fails on -2."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.seen: list[float] = []

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.seen.extend(x[:, 0].tolist())
        if (x[:, 0] == -1).any():
            self.entered.set()
            assert self.release.wait(WAIT)
        if (x[:, 0] == -2).any():
            msg = "poisoned row"
            raise ValueError(msg)
        return x * 2


def _gated(gate: Gate, **options: Any) -> Predictor:
    spec = [TensorSpec("x", np.float32, (None, 2))]
    return Predictor.from_callable(gate, inputs=spec, name="gated", max_batch_size=1, **options)


def _row(value: float) -> bytes:
    return _json_body({"x": np.array([[value, 1.0]], np.float32)})


def _wait_for(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.002)


async def _post(client: httpx.AsyncClient, body: bytes, path: str = "/v2/models/g/infer") -> httpx.Response:
    return await client.post(path, content=body)


def _run_in_process(app: Starlette, scenario: Callable[[httpx.AsyncClient], Any]) -> None:
    async def main() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=WAIT) as client:
            await scenario(client)

    asyncio.run(main())


class TestOverloadDeadlinesFailures:
    """Overload, deadlines, model failures and disconnects map to their statuses."""

    @pytest.mark.parametrize(
        ("status", "limit"), [(503, "max_queue_size"), (429, "max_queue_size"), (503, "max_queue_bytes")]
    )
    def test_a_full_queue_is_503_or_429_with_retry_after(self, status: int, limit: str) -> None:
        """A full queue (``max_queue_size`` requests, or ``max_queue_bytes`` of inputs) answers the
        configured status with Retry-After and queued work still finishes; a request holding more
        than ``max_queue_bytes`` on its own is the client's 400."""
        gate = Gate()
        spec = [TensorSpec("x", np.float32, (None, 2))]
        bound = {limit: 1 if limit == "max_queue_size" else 8}  # one request; one row of 2 float32
        batching = BatchConfig(max_batch_size=1, **bound)  # type: ignore[arg-type]
        predictor = Predictor.from_callable(gate, inputs=spec, name="gated", batching=batching)
        app = create_app(Repository({"g": predictor}), overload_status=status, retry_after_s=2.5)

        async def scenario(client: httpx.AsyncClient) -> None:
            first = asyncio.ensure_future(_post(client, _row(-1)))
            await asyncio.to_thread(gate.entered.wait, WAIT)
            second = asyncio.ensure_future(_post(client, _row(5)))
            await asyncio.to_thread(_wait_for, lambda: predictor.stats().queue_depth == 1)
            refused = await _post(client, _row(6))
            assert refused.status_code == status
            assert refused.headers["Retry-After"] == "3"
            assert "queue is full" in refused.json()["error"]
            assert f"{limit}={bound[limit]}" in refused.json()["error"]
            if limit == "max_queue_bytes":
                too_big = await _post(client, _json_body({"x": np.array([[7, 1], [8, 1]], np.float32)}))
                assert too_big.status_code == 400
                assert "16 bytes of inputs, more than max_queue_bytes=8" in too_big.json()["error"]
            gate.release.set()
            assert (await first).status_code == 200
            assert (await second).status_code == 200
            assert (await _post(client, _row(9))).status_code == 200  # what ran gave its place back

        try:
            _run_in_process(app, scenario)
        finally:
            gate.release.set()
            predictor.close()
        assert not {6.0, 7.0, 8.0} & set(gate.seen)

    def test_deadline_is_504(self) -> None:
        """``parameters.timeout`` (microseconds) is the deadline; a request still queued past it is a 504."""
        gate = Gate()
        predictor = _gated(gate)
        app = create_app(Repository({"g": predictor}))

        async def scenario(client: httpx.AsyncClient) -> None:
            first = asyncio.ensure_future(_post(client, _row(-1)))
            await asyncio.to_thread(gate.entered.wait, WAIT)
            late = json.dumps(
                {"parameters": {"timeout": 20_000}, "inputs": [_json_input("x", np.array([[8.0, 1]], np.float32))]}
            )
            response = await _post(client, late.encode())
            assert response.status_code == 504
            assert "deadline" in response.json()["error"]
            gate.release.set()
            assert (await first).status_code == 200
            assert (await _post(client, _row(3))).status_code == 200

        try:
            _run_in_process(app, scenario)
        finally:
            gate.release.set()
            predictor.close()
        assert 8.0 not in gate.seen

    @pytest.mark.parametrize("timeout", [0, 10**40, 1e300])
    def test_no_deadline_for_zero_or_a_timeout_past_a_year(self, timeout: float) -> None:
        """``timeout`` 0 means none; so does one no platform timer could wait for, and serving goes on."""
        predictor = _scale(1.0, "m")
        app = create_app(Repository({"m": predictor}))
        body = _j({"name": "x"}, parameters={"timeout": timeout})

        async def scenario(client: httpx.AsyncClient) -> None:
            for _ in range(2):
                response = await client.post("/v2/models/m/infer", content=body)
                assert response.status_code == 200, response.text

        try:
            _run_in_process(app, scenario)
        finally:
            predictor.close()

    def test_model_failure_is_500(self) -> None:
        """A model that raises is a 500 naming the error; the next request is served."""
        gate = Gate()
        predictor = _gated(gate)
        app = create_app(Repository({"g": predictor}))

        async def scenario(client: httpx.AsyncClient) -> None:
            failed = await _post(client, _row(-2))
            assert failed.status_code == 500
            assert "poisoned row" in failed.json()["error"]
            assert (await _post(client, _row(1))).status_code == 200

        try:
            _run_in_process(app, scenario)
        finally:
            predictor.close()

    def test_disconnect_cancels_the_queued_request(self) -> None:
        """A client that hangs up while its request is queued: the request is cancelled, never run."""
        gate = Gate()
        predictor = _gated(gate)
        repository = Repository({"g": predictor})
        metrics = Metrics(repository)
        server = Server(create_app(repository, metrics=metrics))
        try:
            with httpx.Client(base_url=server.url, timeout=WAIT) as http:
                first = threading.Thread(target=lambda: _infer(http, "g", _row(-1)))
                first.start()
                assert gate.entered.wait(WAIT)
                body = _row(9)
                with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT) as sock:
                    head = f"POST /v2/models/g/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
                    sock.sendall(head.encode() + body)
                    _wait_for(lambda: predictor.stats().queue_depth == 1)
                _wait_for(lambda: predictor.stats().cancelled == 1)
                outcome = {"model": "g", "arm": "", "outcome": "ClientDisconnected"}
                _wait_for(lambda: metrics.registry.get_sample_value("inferkit_requests_total", outcome) == 1)
                gate.release.set()
                first.join(WAIT)
                assert _infer(http, "g", _row(4)).status_code == 200
        finally:
            gate.release.set()
            server.stop()
            repository.close()
        assert 9.0 not in gate.seen


# -- statistics and metrics ----------------------------------------------------------------


class TestStatsAndMetrics:
    """/v2/models/{m}/stats and /metrics."""

    def test_stats_shape(self, http: httpx.Client) -> None:
        """Triton's statistics shape, per model and for every model."""
        _decode(_infer(http, "mlp", _good()))
        stats = http.get("/v2/models/mlp/stats").json()["model_stats"]
        assert len(stats) == 1
        entry = stats[0]
        assert entry["name"] == "mlp"
        assert entry["inference_stats"]["success"]["count"] >= 1
        assert {"batch_size", "compute_infer"} <= set(entry["batch_stats"][0])
        every = http.get("/v2/models/stats").json()["model_stats"]
        assert {"mlp", "clf", "text"} <= {s["name"] for s in every}
        assert http.get("/v2/models/clf/versions/1/stats").json()["model_stats"][0]["version"] == "1"
        assert http.get("/v2/models/nope/stats").status_code == 404

    def test_metrics_count_requests_by_model_arm_and_outcome(self, http: httpx.Client) -> None:
        """After requests, /metrics counts them with model, arm and outcome labels."""
        _decode(_infer(http, "mlp", _good()))
        _infer(http, "mlp", b"{nope")
        _infer(http, "clf", _json_body({"x": _x()}), {"inferkit-key": "k"})
        response = http.get("/metrics")
        assert response.headers["content-type"].startswith("text/plain")
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text)
            for s in family.samples
        }
        assert samples[("inferkit_requests_total", (("arm", ""), ("model", "mlp"), ("outcome", "success")))] >= 1
        assert samples[("inferkit_requests_total", (("arm", ""), ("model", "mlp"), ("outcome", "InvalidInput")))] >= 1
        routed = [k for k in samples if k[0] == "inferkit_requests_total" and ("model", "clf") in k[1]]
        assert {dict(k[1])["arm"] for k in routed} & {"1", "2"}  # "" for requests pinned to a version
        assert ("inferkit_queue_depth", (("model", "mlp"), ("predictor", "mlp"))) in samples
        assert not any(("model", "nope") in k[1] for k in samples)  # unknown names make no series

    def test_embedded_in_a_callers_registry(self) -> None:
        """Metrics given to create_app register in the caller's registry and are served at /metrics."""
        registry = prometheus_client.CollectorRegistry()
        predictor = _scale(1.0, "m")
        repository = Repository({"m": predictor})
        metrics = Metrics(repository, registry)
        app = create_app(repository, metrics=metrics)

        async def scenario(client: httpx.AsyncClient) -> None:
            assert (await client.post("/v2/models/m/infer", content=_json_body({"x": _x()}))).status_code == 200
            text = (await client.get("/metrics")).text
            assert 'inferkit_requests_total{arm="",model="m",outcome="success"} 1.0' in text

        try:
            _run_in_process(app, scenario)
        finally:
            predictor.close()
        assert (
            registry.get_sample_value("inferkit_requests_total", {"model": "m", "arm": "", "outcome": "success"}) == 1
        )


class TestOutputDtypes:
    """What a model returns comes back as its values, whatever NumPy byte order it used."""

    def test_a_big_endian_output_is_sent_as_its_datatype(self) -> None:
        """An untyped model returning ``>f4`` (or ``>i8``) was a 500: no datatype for that dtype."""
        values = np.array([[1.5, -0.0, 3e6]], np.float32)
        predictor = Predictor.from_callable(lambda a: {"f": a.astype(">f4"), "i": a.astype(">i8")}, name="m")
        server = Server(create_app(Repository({"m": predictor})))
        try:
            with httpx.Client(base_url=server.url, timeout=WAIT) as client:
                body = {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": values.ravel().tolist()}]}
                response = client.post("/v2/models/m/infer", json=body)
                assert response.status_code == 200, response.text
                outputs = response.json()["outputs"]
            assert [o["datatype"] for o in outputs] == ["FP32", "INT64"]
            assert outputs[0]["data"] == values.ravel().tolist()
            assert outputs[1]["data"] == values.astype(np.int64).ravel().tolist()
            client = triton.InferenceServerClient(server.url.removeprefix("http://"))
            x = triton.InferInput("x", [1, 3], "FP32")
            x.set_data_from_numpy(values)
            result = client.infer("m", [x], outputs=[triton.InferRequestedOutput(n, binary_data=True) for n in "fi"])
            np.testing.assert_array_equal(result.as_numpy("f"), values)
            np.testing.assert_array_equal(result.as_numpy("i"), values.astype(np.int64))
            client.close()
        finally:
            server.stop()
            predictor.close()


class TestCreateApp:
    """create_app validates its settings."""

    @pytest.mark.parametrize(
        ("option", "value"), [("max_request_bytes", 0), ("overload_status", 500), ("retry_after_s", -1.0)]
    )
    def test_bad_settings(self, option: str, value: Any) -> None:
        """A bad setting fails at construction with a message naming it."""
        predictor = _scale(1.0, "m")
        try:
            with pytest.raises(ValueError, match=option):
                create_app(Repository({"m": predictor}), **{option: value})
        finally:
            predictor.close()


# -- fuzzing -------------------------------------------------------------------------------

_VALUES: list[Any] = [None, True, 0, -1, 1.5, 2**64, "", "x", "FP32", "BYTES", [], [1], [[1]], {}, {"a": 1}, [-1, 4]]


def _mutate_json(rng: random.Random, obj: Any) -> Any:
    """Replace, delete or add one random field somewhere in ``obj`` (a copy)."""
    obj = json.loads(json.dumps(obj))
    node, path = obj, []
    while isinstance(node, dict | list) and node and rng.random() < 0.7:
        key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
        path.append((node, key))
        node = node[key]
    if not path:
        return rng.choice(_VALUES)
    parent, key = path[-1]
    action = rng.random()
    if action < 0.6:
        parent[key] = rng.choice(_VALUES)
    elif action < 0.8:
        del parent[key]
    elif isinstance(parent, dict):
        parent[rng.choice(["data", "shape", "datatype", "parameters", "binary_data_size", "binary_data", "x"])] = (
            rng.choice(_VALUES)
        )
    else:
        parent.append(rng.choice(_VALUES))
    return obj


def _mutate_bytes(rng: random.Random, body: bytes) -> bytes:
    data = bytearray(body)
    for _ in range(rng.randint(1, 4)):
        action = rng.random()
        position = rng.randrange(len(data) + 1)
        if action < 0.4 and data:
            data[min(position, len(data) - 1)] = rng.randrange(256)
        elif action < 0.6:
            del data[position : position + rng.randint(1, 8)]
        elif action < 0.8:
            data[position:position] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        else:
            data = data[:position]
    return bytes(data)


def _fuzz_cases(rng: random.Random) -> Iterator[tuple[str, bytes, dict[str, str]]]:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    text = np.array([b"ab", b"cde"], dtype=object)
    json_requests = [
        ("mlp", {"inputs": [_json_input("x", x)], "outputs": [{"name": "y"}], "id": "1"}),
        ("text", {"inputs": [_json_input("text", text)], "parameters": {"binary_data_output": True}}),
        (
            "ints",
            {"inputs": [_json_input("a", np.ones((1, 3), np.int64)), _json_input("b", np.ones((1, 3), np.int64))]},
        ),
    ]
    binary_requests = [
        ("mlp", *_binary_body({"x": x})),
        ("text", *_binary_body({"text": text})),
        ("ints", *_binary_body({"a": np.ones((2, 3), np.int64), "b": np.zeros((2, 3), np.int64)})),
    ]
    while True:
        kind = rng.random()
        if kind < 0.35:
            model, request = rng.choice(json_requests)
            yield model, json.dumps(_mutate_json(rng, request)).encode(), {}
        elif kind < 0.6:
            model, request = rng.choice(json_requests)
            yield model, _mutate_bytes(rng, json.dumps(request).encode()), {}
        elif kind < 0.8:
            model, body, headers = rng.choice(binary_requests)
            yield model, _mutate_bytes(rng, body), headers
        else:
            model, body, headers = rng.choice(binary_requests)
            length = int(headers[HEADER_LENGTH])
            mutated = json.dumps(_mutate_json(rng, json.loads(body[:length]))).encode()
            new_length = len(mutated) if rng.random() < 0.8 else rng.randint(0, len(body) + 10)
            yield model, mutated + body[length:], {HEADER_LENGTH: str(new_length)}


class TestFuzz:
    """Mutated valid requests never get a 5xx and never break the server."""

    def test_ten_thousand_mutations(self, repository: Repository) -> None:
        """10,000 mutated JSON and binary requests, 64 at a time: every answer is < 500."""
        app = create_app(repository)
        rng = random.Random(20240611)
        cases = _fuzz_cases(rng)
        statuses: dict[int, int] = {}

        async def one(client: httpx.AsyncClient, model: str, body: bytes, headers: dict[str, str]) -> None:
            response = await client.post(f"/v2/models/{model}/infer", content=body, headers=headers)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            assert response.status_code < 500, (model, body[:300], headers, response.text)
            if response.status_code != 200:
                assert response.json()["error"]

        async def scenario(client: httpx.AsyncClient) -> None:
            for _ in range(10_000 // 64 + 1):
                await asyncio.gather(*(one(client, *next(cases)) for _ in range(64)))
            response = await client.post("/v2/models/mlp/infer", content=_good())
            assert response.status_code == 200

        _run_in_process(app, scenario)
        assert statuses.get(200, 0) > 100  # some mutations stay valid
        assert statuses.get(400, 0) > 5_000
