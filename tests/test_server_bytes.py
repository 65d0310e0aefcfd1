"""BYTES tensors keep their exact content across every wire form, in and out, on both faces.

An ONNX Runtime string model gets text (NUL and multi-byte UTF-8 included; bytes that are not
UTF-8 are a 400, as its string tensors cannot hold them); a Python function gets the bytes as
sent, whatever they are. Each case goes through a live ``InferenceServer`` with real clients.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from onnx import TensorProto, helper
from test_server_rest import TritonClient  # closed explicitly: its __del__ raises off its thread

from inferkit import Predictor
from inferkit.server import proto as pb
from inferkit.server.protocol import unpack_bytes
from inferkit.server.repository import Repository
from inferkit.server.run import InferenceServer

WAIT = 30
TEXT = [b"hello", b"a\x00b", "\u00e9\u4e2d".encode(), b"", b"42"]  # NUL, multi-byte UTF-8, empty
RAW = [b"\xff\xfe\x00", b"\x80", b"plain"]  # not UTF-8


def _strings_model() -> bytes:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["s"], ["t"])],
        "strings",
        [helper.make_tensor_value_info("s", TensorProto.STRING, ["N"])],
        [helper.make_tensor_value_info("t", TensorProto.STRING, ["N"])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9).SerializeToString()


def _echo(x: np.ndarray) -> np.ndarray:
    return x


@pytest.fixture(name="server")
def _server() -> Iterator[InferenceServer]:
    repository = Repository(
        {
            "onnx": Predictor.from_onnx(_strings_model(), name="onnx"),
            "echo": Predictor.from_callable(_echo, name="echo"),
        }
    )
    server = InferenceServer(repository, port=0, grpc_port=0, grpc_listeners=1).start(WAIT)
    yield server
    server.join(WAIT)


def _framed(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def _binary_request(name: str, items: list[bytes], shape: list[int]) -> tuple[bytes, dict[str, str]]:
    raw = _framed(items)
    tensor = {"name": name, "shape": shape, "datatype": "BYTES", "parameters": {"binary_data_size": len(raw)}}
    header = {"inputs": [tensor], "parameters": {"binary_data_output": True}}
    head = json.dumps(header).encode()
    return head + raw, {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}


def _binary_output(response: httpx.Response) -> list[bytes]:
    length = int(response.headers["Inference-Header-Content-Length"])
    header = json.loads(response.content[:length])
    (out,) = header["outputs"]
    count = int(np.prod(out["shape"]))
    return list(unpack_bytes(response.content[length:], count, out["name"]))


class TestRest:
    def test_json_strings_reach_onnx_as_text(self, server: InferenceServer) -> None:
        """JSON strings (UTF-8 text by definition) come back from an ONNX string model unchanged, not as repr."""
        texts = [b.decode() for b in TEXT]
        body = {"inputs": [{"name": "s", "shape": [len(texts)], "datatype": "BYTES", "data": texts}]}
        response = httpx.post(f"http://127.0.0.1:{server.port}/v2/models/onnx/infer", json=body, timeout=WAIT)
        assert response.status_code == 200, response.text
        assert response.json()["outputs"][0]["data"] == texts

    def test_binary_bytes_round_trip_through_onnx(self, server: InferenceServer) -> None:
        """Binary BYTES with NUL and multi-byte UTF-8 come back byte for byte."""
        body, headers = _binary_request("s", TEXT, [len(TEXT)])
        url = f"http://127.0.0.1:{server.port}/v2/models/onnx/infer"
        response = httpx.post(url, content=body, headers=headers, timeout=WAIT)
        assert response.status_code == 200, response.text
        assert _binary_output(response) == TEXT

    def test_non_utf8_to_onnx_is_a_400(self, server: InferenceServer) -> None:
        """Bytes an ONNX string tensor cannot hold are the client's error, with the reason."""
        client = TritonClient(f"127.0.0.1:{server.port}")
        try:
            tensor = triton_http.InferInput("s", [1], "BYTES")
            tensor.set_data_from_numpy(np.array([b"\xff\xfe"], dtype=object))
            with pytest.raises(Exception, match="not UTF-8") as info:
                client.infer("onnx", [tensor])
            assert info.value.status() == "400"
        finally:
            client.close()

    def test_arbitrary_bytes_round_trip_through_a_function(self, server: InferenceServer) -> None:
        """A Python function gets the bytes as sent, and they come back exactly (binary, never repr)."""
        body, headers = _binary_request("x", RAW, [len(RAW), 1])
        response = httpx.post(
            f"http://127.0.0.1:{server.port}/v2/models/echo/infer", content=body, headers=headers, timeout=WAIT
        )
        assert response.status_code == 200, response.text
        assert _binary_output(response) == RAW

    def test_tritonclient_http(self, server: InferenceServer) -> None:
        """tritonclient.http (binary by default) through the ONNX model."""
        client = TritonClient(f"127.0.0.1:{server.port}")
        try:
            tensor = triton_http.InferInput("s", [len(TEXT)], "BYTES")
            tensor.set_data_from_numpy(np.array(TEXT, dtype=object))
            result = client.infer("onnx", [tensor])
            assert list(result.as_numpy("t")) == TEXT
        finally:
            client.close()


class TestGrpc:
    def test_raw_contents_through_onnx(self, server: InferenceServer) -> None:
        """tritonclient.grpc sends raw_input_contents; the strings come back exactly."""
        client = triton_grpc.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
        try:
            tensor = triton_grpc.InferInput("s", [len(TEXT)], "BYTES")
            tensor.set_data_from_numpy(np.array(TEXT, dtype=object))
            assert list(client.infer("onnx", [tensor]).as_numpy("t")) == TEXT
            bad = triton_grpc.InferInput("s", [1], "BYTES")
            bad.set_data_from_numpy(np.array([b"\x80"], dtype=object))
            with pytest.raises(Exception, match="not UTF-8") as info:
                client.infer("onnx", [bad])
            assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
        finally:
            client.close()

    @pytest.mark.parametrize(("model", "items"), [("onnx", TEXT), ("echo", RAW)])
    def test_typed_bytes_contents(self, server: InferenceServer, model: str, items: list[bytes]) -> None:
        """bytes_contents in, raw_output_contents out: the same bytes."""
        with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            call = channel.unary_unary(
                f"/{pb.SERVICE}/ModelInfer",
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=pb.ModelInferResponse.FromString,
            )
            request = pb.ModelInferRequest(model_name=model)
            shape = [len(items)] if model == "onnx" else [len(items), 1]
            request.inputs.add(name="s" if model == "onnx" else "x", datatype="BYTES", shape=shape)
            request.inputs[0].contents.bytes_contents.extend(items)
            response = call(request, timeout=WAIT)
        assert response.outputs[0].datatype == "BYTES"
        assert list(unpack_bytes(response.raw_output_contents[0], len(items), "out")) == items
