"""The rules both server faces share: request options, raw tensor bytes, BYTES framing, status codes."""

from __future__ import annotations

import numpy as np
import pytest

from inferkit.errors import Closed, DeadlineExceeded, InvalidInput, ModelError, ModelNotFound, Overloaded
from inferkit.server.protocol import (
    MAX_DIMS,
    check_outputs,
    element_count,
    fit,
    from_raw,
    http_status,
    pack_bytes,
    request_options,
    shaped,
    to_raw,
    unpack_bytes,
)


class TestRequestOptions:
    """timeout, priority and key as tritonclient sends them."""

    def test_timeout_is_microseconds_and_the_earlier_deadline_wins(self) -> None:
        """timeout is read in microseconds, 0 is none, and a transport deadline can only shorten it."""
        assert request_options({"timeout": 250_000})[0] == 0.25
        assert request_options({"timeout": 0})[0] is None
        assert request_options({"timeout": 250_000}, remaining_s=0.1)[0] == 0.1
        assert request_options({}, remaining_s=0.1)[0] == 0.1
        assert request_options({"timeout": 1e30})[0] is None

    def test_priority_follows_triton_levels(self) -> None:
        """Level 1 outranks level 2, and every explicit level outranks the default (0 or absent)."""
        default = request_options({})[1]
        one = request_options({"priority": 1})[1]
        two = request_options({"priority": 2})[1]
        assert default == request_options({"priority": 0})[1] == 0
        assert one > two > default
        last = [request_options({"priority": p})[1] for p in (2**31 - 2, 2**31 - 1, 2**31, 2**63, 2**64 - 1)]
        assert two > last[0] > last[1] == last[2] == last[3] == last[4] > default  # the uint64 the wire allows

    def test_header_key_wins_and_keys_are_strings(self) -> None:
        """A header or metadata key wins over the parameter; an int key routes as its string."""
        assert request_options({"key": 42})[2] == "42"
        assert request_options({"key": "a"}, key="b")[2] == "b"
        assert request_options({})[2] is None

    def test_sequence_batching_is_refused(self) -> None:
        """A request that belongs to a sequence is refused, on both faces alike; a zero id is no sequence."""
        with pytest.raises(InvalidInput, match="sequence batching"):
            request_options({"sequence_id": 7})
        assert request_options({"sequence_id": 0}) == (None, 0, None)

    @pytest.mark.parametrize(
        ("parameters", "name"),
        [
            ({"timeout": -1}, "timeout"),
            ({"timeout": "soon"}, "timeout"),
            ({"priority": 1.5}, "priority"),
            ({"priority": -1}, "priority"),
            ({"priority": True}, "priority"),
            ({"key": [1]}, "key"),
        ],
    )
    def test_bad_values_are_invalid_input(self, parameters: dict[str, object], name: str) -> None:
        """A malformed option is InvalidInput naming the parameter."""
        with pytest.raises(InvalidInput, match=f"parameter '{name}'"):
            request_options(parameters)


class TestBytes:
    """BYTES framing: a 4-byte little-endian length before each element."""

    def test_round_trip(self) -> None:
        """pack then unpack gives the elements back."""
        items = np.array([b"", b"a", "h\u00e9".encode(), b"\x00" * 300], dtype=object)
        np.testing.assert_array_equal(unpack_bytes(pack_bytes(items), 4, "t"), items)

    @pytest.mark.parametrize(
        ("data", "count", "message"),
        [
            (b"\x01\x00\x00\x00", 1, "claims 1 bytes"),
            (b"\x64\x00\x00\x00ab\x00\x00\x00\x00", 2, "element 0 claims 100 bytes, 6 remain"),
            (b"\x04\x00\x00\x00abcd\x00\x00\x00\x00", 3, "ends after 2 of 3"),
            (b"\x00\x00\x00\x00extra", 1, "left over"),
            (b"", 2**40, "cannot hold"),
        ],
    )
    def test_malformed_framing(self, data: bytes, count: int, message: str) -> None:
        """Truncated, overlong or impossible framing is InvalidInput, before any large allocation."""
        with pytest.raises(InvalidInput, match=message):
            unpack_bytes(data, count, "t")


class TestRawTensors:
    """Raw little-endian tensor bytes, as both faces send and receive them."""

    @pytest.mark.parametrize("dtype", ["<f4", ">f4", "<i8", ">u2", "?"])
    def test_round_trip_is_little_endian(self, dtype: str) -> None:
        """Any byte order goes out little-endian and C-ordered, and comes back equal."""
        array = np.arange(6).reshape(2, 3).astype(dtype).T  # not C-contiguous either
        raw = to_raw(array)
        assert raw == np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
        datatype = {"f": "FP32", "i": "INT64", "u": "UINT16", "b": "BOOL"}[array.dtype.kind]
        np.testing.assert_array_equal(from_raw(raw, datatype, 6, "x").reshape(3, 2), array)

    def test_bytes_tensors_are_framed(self) -> None:
        """BYTES (and str) arrays use the BYTES framing."""
        array = np.array([b"a", "bc"], dtype=object)
        assert to_raw(array) == pack_bytes(array)
        assert list(from_raw(to_raw(array), "BYTES", 2, "s")) == [b"a", b"bc"]

    @pytest.mark.parametrize(
        ("raw", "datatype", "count", "message"),
        [
            (b"\0" * 7, "FP32", 2, "7 bytes of raw data, but 2 FP32 elements take 8"),
            (b"\0" * 9, "FP32", 2, "9 bytes of raw data"),
            (b"\x00\x02", "BOOL", 2, "BOOL data must be bytes 0 or 1"),
            (b"", "BYTES", 2**40, "cannot hold"),
        ],
    )
    def test_malformed_raw_data(self, raw: bytes, datatype: str, count: int, message: str) -> None:
        """A size that does not match, or BOOL bytes other than 0/1, is InvalidInput naming the input."""
        with pytest.raises(InvalidInput, match=message) as caught:
            from_raw(raw, datatype, count, "x")
        assert caught.value.input_name == "x"

    def test_fit_narrows_integers_or_names_the_range(self) -> None:
        """Integers that fit the datatype are cast; one that does not is InvalidInput with the bounds."""
        fitted = fit(np.array([-128, 127], dtype=np.int32), "INT8", "x")
        assert fitted.dtype == np.int8
        assert fitted.tolist() == [-128, 127]
        with pytest.raises(InvalidInput, match=r"input 'x': values 0\.\.300 do not fit UINT8 \[0, 255\]"):
            fit(np.array([0, 300], dtype=np.uint32), "UINT8", "x")

    def test_unknown_outputs(self) -> None:
        """A requested output the model does not have is InvalidInput naming it and the known ones."""
        check_outputs(["y"], ("y", "z"))
        with pytest.raises(
            InvalidInput, match=r"unexpected inference output 'q' for model ''; the model has \['y', 'z'\]"
        ):
            check_outputs(["y", "q"], ("z", "y"))


class TestShapes:
    """A client's shape is checked before any work in proportion to what it claims."""

    def test_element_count(self) -> None:
        """The product of the dimensions, as a Python int (a lying shape cannot overflow)."""
        assert element_count((2, 3), "x") == 6
        assert element_count((), "x") == 1
        assert element_count((2**62, 2**62), "x") == 2**124

    def test_a_million_dimensions_are_refused_before_their_product(self) -> None:
        """Counting 10**6 dims of 2**63 - 1 would take minutes; the dimension count is checked first."""
        with pytest.raises(
            InvalidInput, match=f"1000000 dimensions, over the maximum supported dimension count {MAX_DIMS}"
        ):
            element_count((2**63 - 1,) * 10**6, "x")
        with pytest.raises(InvalidInput, match="negative dimension") as caught:
            element_count((2, -1), "x")
        assert caught.value.input_name == "x"

    def test_shaped_quotes_a_bounded_part_of_a_long_shape(self) -> None:
        """NumPy's refusal of 70 dimensions is InvalidInput, and the message does not grow with the shape."""
        with pytest.raises(InvalidInput, match="maximum supported dimension") as caught:
            shaped(np.zeros(1), (1,) * 10_000, "x")
        assert len(str(caught.value)) < 400


def test_status_codes() -> None:
    """Each error maps to its HTTP status."""
    assert http_status(InvalidInput("x")) == 400
    assert http_status(ModelNotFound("x")) == 404
    assert http_status(Overloaded(1, 1)) == 503
    assert http_status(Overloaded(1, 1), overload_status=429) == 429
    assert http_status(DeadlineExceeded("x")) == 504
    assert http_status(Closed("x")) == 503
    assert http_status(ModelError("x")) == 500
