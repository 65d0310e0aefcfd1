"""Claims a client makes cost the server nothing it did not bound: names, empty shapes, typed contents.

Found by probing the server after the first reliability fixes; each case failed before its fix.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc
import numpy as np
import pytest
from test_server_grpc import Served, _serve, good, scaled  # noqa: F401 (_serve: the serve fixture)

from inferkit.errors import InvalidInput
from inferkit.server import proto as pb
from inferkit.server.grpc_messages import MAX_FIELDS, TypedPart
from inferkit.server.limits import ConnectionLimits
from inferkit.server.metrics import Metrics
from inferkit.server.protocol import MAX_EMPTY_CLAIM, element_count
from inferkit.server.repository import Repository
from inferkit.server.rest_decode import decode_request

CODE = grpc.StatusCode
WAIT = 30


class TestMetricNames:
    def test_made_up_model_names_add_no_series(self) -> None:
        """Both faces report every request to Metrics; names the server does not serve add no series."""
        predictor = scaled(2)
        try:
            metrics = Metrics(Repository({"m": predictor}))
            for i in range(200):
                metrics.observe(f"nope-{i}", None, "ModelNotFound", 0.001)
            metrics.observe("m", None, "success", 0.001)
            metrics.observe("", None, "InvalidInput", 0.001)  # a message that did not parse
            text = metrics.render()[0].decode()
        finally:
            predictor.close(WAIT)
        assert "nope-" not in text
        assert 'inferkit_requests_total{arm="",model="m",outcome="success"} 1.0' in text
        assert 'model="",outcome="InvalidInput"' in text


class TestEmptyClaims:
    @pytest.mark.parametrize("shape", [[1, 2**24, 0], [1, 2**40, 0], [2**21, 0]])
    def test_an_empty_tensor_claiming_too_much_is_refused(self, shape: list[int]) -> None:
        """No data, a shape claiming more than MAX_EMPTY_CLAIM positions: InvalidInput before any model sees it."""
        with pytest.raises(InvalidInput, match="holds no data but claims"):
            element_count(shape, "x")
        body = b'{"inputs":[{"name":"x","shape":%s,"datatype":"FP32","data":[]}]}' % str(shape).encode()
        with pytest.raises(InvalidInput, match="holds no data but claims"):
            decode_request(body)

    def test_real_empty_requests_pass(self) -> None:
        """[N, 0] up to the bound, and zero rows of anything small, are still tensors with a count of 0."""
        assert element_count([MAX_EMPTY_CLAIM, 0], "x") == 0
        assert element_count([0, 4], "x") == 0
        assert element_count([3, 4], "x") == 12

    def test_over_grpc(self, serve: Callable[..., Served]) -> None:
        """The same claim over gRPC with empty raw contents: INVALID_ARGUMENT, and the server serves on."""
        served = serve({"m": scaled(2)})
        request = pb.ModelInferRequest(model_name="m")
        request.inputs.add(name="x", datatype="FP32", shape=[1, 2**40, 0])
        request.raw_input_contents.append(b"")
        with pytest.raises(grpc.RpcError) as info:
            served.call("ModelInfer", request, timeout=WAIT)
        assert info.value.code() == CODE.INVALID_ARGUMENT
        assert "holds no data but claims" in info.value.details()
        good(served)


class TestTypedContents:
    def test_a_large_typed_request_is_refused_before_it_is_parsed(self, serve: Callable[..., Served]) -> None:
        """Typed contents past max_json_bytes get INVALID_ARGUMENT naming the limit; raw ones of that size pass."""
        served = serve({"m": scaled(2)}, limits=ConnectionLimits(max_json_bytes=4096))
        rows = 512
        typed = pb.ModelInferRequest(model_name="m")
        typed.inputs.add(name="x", datatype="FP32", shape=[rows, 4]).contents.fp32_contents.extend([1.0] * rows * 4)
        assert typed.ByteSize() > 4096
        with pytest.raises(grpc.RpcError) as info:
            served.call("ModelInfer", typed, timeout=WAIT)
        assert info.value.code() == CODE.INVALID_ARGUMENT
        assert "max_json_bytes=4096" in info.value.details()
        raw = pb.ModelInferRequest(model_name="m")
        raw.inputs.add(name="x", datatype="FP32", shape=[rows, 4])
        raw.raw_input_contents.append(np.ones((rows, 4), np.float32).tobytes())
        response = served.call("ModelInfer", raw, timeout=WAIT)
        out = np.frombuffer(response.raw_output_contents[0], np.float32)
        np.testing.assert_array_equal(out, np.full(rows * 4, 2.0, np.float32))

    def test_the_typed_part_is_counted_from_the_top_level_tags(self) -> None:
        """The pre-parse count takes every byte but raw payloads, wherever field 7 stands (its tags and lengths
        count), stops past the limit, and counts whole what it cannot walk (the parser reports it)."""
        request = pb.ModelInferRequest(model_name="m", id="r")
        request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
        request.parameters["priority"].int64_param = 3
        typed = request.ByteSize()
        request.raw_input_contents.append(b"\0" * 300)  # a two-byte length
        request.raw_input_contents.append(b"")
        part = TypedPart(request.SerializeToString())
        assert part.walk(2**20)
        assert (part.nbytes, part.fields) == (typed + 3 + 2, 4)
        over = TypedPart(b"\x2a\x00" * 100)
        assert over.walk(10)
        assert (over.nbytes, over.fields) == (12, 6)
        broken = TypedPart(b"\x3a\x00\xff\xff\xff")
        assert broken.walk(2**20)
        assert broken.nbytes == 5

    def test_the_typed_part_is_walked_a_few_fields_at_a_time_raw_entries_too(self) -> None:
        """Only typed fields counted towards the steps walked on the event loop: 8M empty raw entries (16 MiB)
        were walked there in one go, freezing it for 1.5 s; now they go on to a worker thread like typed ones."""
        for field in (b"\x3a\x00", b"\x2a\x00"):  # an empty raw entry, an empty parameter
            part = TypedPart(field * 10_000)
            assert not part.walk(2**20, 4096)
            assert part.nbytes == 2 * 4096
            assert part.walk(2**20)
            assert part.nbytes == 2 * 10_000

    @pytest.mark.parametrize("field", [b"\x32\x00", b"\x3a\x00"])  # an empty output, an empty raw entry
    def test_the_walk_stops_past_the_fields_a_request_can_need(self, field: bytes) -> None:
        """16 MiB of 2-byte fields (8M) within max_json_bytes were all walked (~3 s of CPU on a worker thread)
        before the budget refused the message; now the walk stops one past MAX_FIELDS, raw entries counted."""
        part = TypedPart(field * 8 * 2**20)
        assert not part.walk(16 * 2**20, 4096)
        assert part.walk(16 * 2**20)
        assert part.too_many
        assert part.walked == MAX_FIELDS + 1
        enough = TypedPart(field * MAX_FIELDS)
        assert enough.walk(16 * 2**20)
        assert not enough.too_many

    def test_a_message_of_too_many_fields_is_refused_unparsed(self, serve: Callable[..., Served]) -> None:
        """Such a message is INVALID_ARGUMENT naming the limit (it was RESOURCE_EXHAUSTED after the whole walk),
        and the server serves on."""
        served = serve({"m": scaled(2)})
        message = pb.ModelInferRequest(model_name="m").SerializeToString() + b"\x32\x00" * (8 * 2**20 - 4)
        assert len(message) <= ConnectionLimits().max_json_bytes  # all typed, within the limit
        with pytest.raises(grpc.RpcError) as info:
            served.call("ModelInfer", message, timeout=WAIT)
        assert info.value.code() == CODE.INVALID_ARGUMENT, info.value
        assert f"more than {MAX_FIELDS} top-level fields" in info.value.details()
        assert ("", None, "InvalidInput") in served.metrics.outcomes()
        good(served)
