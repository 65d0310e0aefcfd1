"""Tests for inferkit.signature: tensor specs, request validation and batch keys."""

from __future__ import annotations

import re
from typing import Any

import attrs
import numpy as np
import onnx
import onnxruntime
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper

import inferkit
from inferkit import signature
from inferkit.errors import InvalidInput
from inferkit.signature import (
    SINGLE,
    Signature,
    TensorSpec,
    batch_key,
    normalize_untyped,
    rows,
)

ONE = Signature([TensorSpec("x", np.float32, (None, 64))])
TWO = Signature([TensorSpec("x", "float32", (None, 4)), TensorSpec("ids", "int64", (None, 3))])


def spec_of(dtype: Any, shape: tuple[int | None, ...] = (None, 2)) -> Signature:
    """Build a one-input signature named 'x'."""
    return Signature([TensorSpec("x", dtype, shape)])


def session_for(
    inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto] | None = None
) -> onnxruntime.InferenceSession:
    """Build a real ONNX model that passes each input through an Identity node."""
    if outputs is None:
        outputs = [helper.make_value_info(f"{vi.name}_out", vi.type) for vi in inputs]
    nodes = [helper.make_node("Identity", [i.name], [o.name]) for i, o in zip(inputs, outputs, strict=True)]
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    return onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


class TestTensorSpec:
    def test_dtype_converter_accepts_dtype_likes(self) -> None:
        """A numpy type, a string and a dtype all become the same np.dtype."""
        specs = [TensorSpec("x", d, (None,)) for d in (np.float32, "float32", np.dtype("f4"))]
        assert all(s.dtype == np.dtype(np.float32) for s in specs)
        assert isinstance(specs[1].dtype, np.dtype)

    def test_shape_is_normalized_to_a_tuple_of_ints(self) -> None:
        """A list shape with numpy integer dims becomes a tuple of Python ints."""
        spec = TensorSpec("x", "int64", [None, np.int64(3), None])
        assert spec.shape == (None, 3, None)
        assert type(spec.shape[1]) is int

    def test_empty_shape_is_rejected(self) -> None:
        """A shape without the batch axis is refused, showing the bad value."""
        with pytest.raises(
            ValueError,
            match=r"shape must have at least one axis \(the batch\), got \(\)",
        ):
            TensorSpec("x", "float32", ())

    def test_fixed_batch_axis_is_rejected(self) -> None:
        """Axis 0 is always dynamic, so a fixed size there is refused."""
        with pytest.raises(
            ValueError,
            match=r"shape\[0\] is the batch axis and must be None, got \(8, 4\)",
        ):
            TensorSpec("x", "float32", (8, 4))

    @pytest.mark.parametrize("dim", [-1, 2.0, "4", True])
    def test_bad_fixed_dim_is_rejected(self, dim: object) -> None:
        """A fixed dim must be a non-negative int; the message shows the bad one."""
        with pytest.raises(ValueError, match=rf"shape\[1\] must be an int >= 0 or None, got {dim!r}"):
            TensorSpec("x", "float32", (None, dim))  # type: ignore[arg-type]

    def test_zero_sized_fixed_dim_is_allowed(self) -> None:
        """A fixed dim of 0 is legal (an empty feature axis)."""
        assert TensorSpec("x", "float32", (None, 0)).shape == (None, 0)

    @pytest.mark.parametrize("dtype", ["complex64", "U8", "datetime64[s]"])
    def test_unsupported_dtype_is_rejected(self, dtype: str) -> None:
        """Only bool, integer, float and object (string) dtypes describe a tensor."""
        with pytest.raises(ValueError, match=r"dtype must be bool, integer, float or object"):
            TensorSpec("x", dtype, (None,))

    def test_name_must_be_str(self) -> None:
        """A non-str name is a type error."""
        with pytest.raises(TypeError, match="name"):
            TensorSpec(0, "float32", (None,))  # type: ignore[arg-type]

    def test_is_frozen_and_hashable(self) -> None:
        """Specs are immutable values usable as dict keys."""
        spec = TensorSpec("x", "float32", (None, 4))
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            spec.name = "y"  # type: ignore[misc]
        assert {spec: 1}[TensorSpec("x", np.float32, [None, 4])] == 1

    def test_describe_names_dtype_and_shape(self) -> None:
        """describe() renders the batch axis as N and other dynamic dims as ?."""
        assert TensorSpec("x", "float32", (None, 64)).describe() == "float32 with shape (N, 64)"
        assert TensorSpec("x", object, (None,)).describe() == "string (object) with shape (N,)"
        assert TensorSpec("x", "int8", (None, None, 3)).describe() == "int8 with shape (N, ?, 3)"


class TestSignature:
    def test_needs_at_least_one_input(self) -> None:
        """A signature without inputs is refused."""
        with pytest.raises(ValueError, match=r"inputs must hold at least one TensorSpec, got \(\)"):
            Signature([])

    def test_input_names_must_be_unique(self) -> None:
        """Two inputs with the same name are refused, listing the names."""
        spec = TensorSpec("x", "float32", (None,))
        with pytest.raises(ValueError, match=r"inputs need unique names, got 'x', 'x'"):
            Signature([spec, spec])

    def test_items_must_be_specs(self) -> None:
        """Inputs and outputs hold TensorSpec objects only."""
        with pytest.raises(TypeError, match="outputs must hold TensorSpec objects"):
            Signature([TensorSpec("x", "float32", (None,))], ["y"])  # type: ignore[list-item]

    def test_outputs_default_to_unknown(self) -> None:
        """Outputs default to an empty tuple and lists become tuples."""
        sig = Signature([TensorSpec("x", "float32", (None,))])
        assert sig.outputs == ()
        assert isinstance(sig.inputs, tuple)
        assert sig == Signature((TensorSpec("x", "float32", (None,)),))


class TestNormalize:
    def test_exact_array_passes_uncopied(self) -> None:
        """The common case returns the caller's array itself under the input name."""
        x = np.zeros((3, 64), np.float32)
        out = ONE.normalize(x)
        assert list(out) == ["x"]
        assert out["x"] is x

    def test_single_input_accepts_a_one_key_mapping(self) -> None:
        """A one-input model also takes {name: array}."""
        x = np.zeros((2, 64), np.float32)
        assert ONE.normalize({"x": x})["x"] is x

    def test_dynamic_non_batch_dim_accepts_any_size(self) -> None:
        """A None dim past the batch axis matches any length."""
        sig = spec_of("float32", (None, None, 3))
        assert sig.normalize(np.zeros((2, 7, 3), np.float32))["x"].shape == (2, 7, 3)

    def test_layout_is_left_alone(self) -> None:
        """A non-contiguous view passes through as the same object."""
        x = np.zeros((64, 6), np.float32).T[::2]
        assert not x.flags.c_contiguous
        assert ONE.normalize(x)["x"] is x

    def test_multi_input_mapping_in_input_order(self) -> None:
        """A mapping with exactly the input names comes back in signature order."""
        ids = np.zeros((2, 3), np.int64)
        out = TWO.normalize({"ids": ids, "x": np.zeros((2, 4), np.float32)})
        assert list(out) == ["x", "ids"]
        assert out["ids"] is ids

    def test_multi_input_needs_a_mapping(self) -> None:
        """A bare array for a two-input model names the expected inputs."""
        with pytest.raises(
            InvalidInput,
            match=r"expected a mapping with inputs 'x', 'ids', got ndarray",
        ):
            TWO.normalize(np.zeros((2, 4), np.float32))

    def test_unknown_input_is_named(self) -> None:
        """An extra key is named, along with the expected names."""
        with pytest.raises(InvalidInput, match=r"unknown input 'z'; expected 'x', 'ids'") as info:
            TWO.normalize({"x": [[1.0] * 4], "ids": [[1, 2, 3]], "z": [1]})
        assert info.value.input_name == "z"

    def test_missing_input_is_named(self) -> None:
        """A missing key is named, along with the expected names."""
        with pytest.raises(InvalidInput, match=r"missing input 'ids'; expected 'x', 'ids'") as info:
            TWO.normalize({"x": np.zeros((1, 4), np.float32)})
        assert info.value.input_name == "ids"

    @pytest.mark.parametrize("value", ["abc", None, object(), {"a": 1}, 3.0])
    def test_non_array_values_are_rejected(self, value: object) -> None:
        """Only ndarrays and lists/tuples count as arrays, bare or in a mapping."""
        got = type(value).__name__
        match = rf"^input 'x': expected an array \(np.ndarray, list or tuple\), got {got}$"
        with pytest.raises(InvalidInput, match=match):
            ONE.normalize({"x": value})
        if not isinstance(value, dict):
            with pytest.raises(InvalidInput, match=match):
                ONE.normalize(value)

    def test_ragged_list_is_rejected(self) -> None:
        """A list that numpy cannot make rectangular is not an array."""
        with pytest.raises(InvalidInput, match=r"input 'x': expected an array, got a list"):
            spec_of("float32").normalize([[1.0, 2.0], [3.0]])

    def test_missing_batch_axis_suggests_adding_one(self) -> None:
        """A 1-D vector for an (N, 64) input is refused with a batch-axis hint."""
        with pytest.raises(
            InvalidInput,
            match=r"got float32 with shape \(64,\); add a batch axis, e\.g\. x\[None\]",
        ):
            ONE.normalize(np.zeros(64, np.float32))

    def test_wrong_fixed_dim_states_expected_and_got(self) -> None:
        """A fixed-dim mismatch says what was expected and what came."""
        with pytest.raises(
            InvalidInput,
            match=r"^input 'x': expected float32 with shape \(N, 64\), "
            r"got float32 with shape \(3, 32\)$",
        ):
            ONE.normalize(np.zeros((3, 32), np.float32))

    def test_wrong_rank_above_is_rejected(self) -> None:
        """An extra axis is a shape mismatch with no batch-axis hint."""
        with pytest.raises(InvalidInput, match=r"got float32 with shape \(1, 3, 64\)$"):
            ONE.normalize(np.zeros((1, 3, 64), np.float32))

    def test_empty_batch_is_rejected(self) -> None:
        """A request needs at least one row, even on the fast path."""
        with pytest.raises(InvalidInput, match=r"input 'x': got an empty batch \(0 rows\)"):
            ONE.normalize(np.zeros((0, 64), np.float32))

    def test_inputs_need_equal_rows(self) -> None:
        """All inputs of a request must have the same number of rows."""
        request = {"x": np.zeros((2, 4), np.float32), "ids": np.zeros((3, 3), np.int64)}
        with pytest.raises(InvalidInput, match=r"inputs need equal rows, but 'x' has 2 and 'ids' 3") as info:
            TWO.normalize(request)
        assert info.value.input_name == "ids"

    def test_errors_are_value_errors_with_the_input_name(self) -> None:
        """InvalidInput is catchable as ValueError and carries the input name."""
        with pytest.raises(ValueError, match="input 'x'") as info:
            ONE.normalize(np.zeros((3, 32), np.float32))
        assert isinstance(info.value, InvalidInput)
        assert info.value.input_name == "x"

    @pytest.mark.parametrize(
        ("src", "dst"),
        [("float64", "float32"), ("float16", "float64"), (">f4", "float32")],
    )
    def test_float_family_is_cast(self, src: str, dst: str) -> None:
        """A float array of another width or byte order is cast to the spec dtype."""
        x = np.arange(6, dtype=src).reshape(3, 2)
        out = spec_of(dst).normalize(x)["x"]
        assert out.dtype == np.dtype(dst)
        np.testing.assert_array_equal(out, x)

    def test_float_overflow_is_rejected(self) -> None:
        """A float64 value too big for float16 is refused instead of becoming inf."""
        with pytest.raises(InvalidInput, match="input 'x': values overflow float16"):
            spec_of("float16").normalize(np.array([[1e10, 0.0]]))

    @pytest.mark.parametrize(
        ("src", "dst"),
        [("int8", "int64"), ("uint8", "int16"), ("int64", "int8"), ("int64", "uint8")],
    )
    def test_integer_family_is_cast_when_values_fit(self, src: str, dst: str) -> None:
        """Integers cast across widths and signedness when every value fits."""
        x = np.array([[0, 1], [2, 100]], dtype=src)
        out = spec_of(dst).normalize(x)["x"]
        assert out.dtype == np.dtype(dst)
        np.testing.assert_array_equal(out, x)

    @pytest.mark.parametrize(
        ("src", "dst", "values", "shown"),
        [
            ("int64", "int8", [[1, 300]], "values 1..300 do not fit int8 [-128, 127]"),
            ("int16", "uint8", [[-1, 2]], "values -1..2 do not fit uint8 [0, 255]"),
            ("uint64", "int64", [[0, 2**63]], f"values 0..{2**63} do not fit int64"),
        ],
    )
    def test_narrowing_integer_cast_checks_values(self, src: str, dst: str, values: Any, shown: str) -> None:
        """A narrowing integer cast of out-of-range values is refused."""
        with pytest.raises(InvalidInput, match=rf"input 'x': {re.escape(shown)}"):
            spec_of(dst).normalize(np.array(values, dtype=src))

    @pytest.mark.parametrize(
        ("src", "dst"),
        [
            ("int8", "float32"),
            ("float32", "int64"),
            ("bool", "float32"),
            ("int64", "bool"),
            ("bool", "int32"),
            ("complex64", "float32"),
        ],
    )
    def test_casts_across_kinds_are_rejected(self, src: str, dst: str) -> None:
        """An ndarray of another kind is refused, stating expected and got."""
        with pytest.raises(
            InvalidInput,
            match=rf"^input 'x': expected {dst} with shape \(N, 2\), "
            rf"got {src} with shape \(3, 2\)$",
        ):
            spec_of(dst).normalize(np.zeros((3, 2), dtype=src))

    def test_the_documented_example_message(self) -> None:
        """An int8 array for a float32 input reads exactly as documented."""
        with pytest.raises(InvalidInput) as info:
            ONE.normalize(np.zeros((3, 64), np.int8))
        assert str(info.value) == "input 'x': expected float32 with shape (N, 64), got int8 with shape (3, 64)"

    def test_bool_from_bool(self) -> None:
        """A bool input takes a bool array as is."""
        x = np.ones((2, 2), bool)
        assert spec_of("bool").normalize(x)["x"] is x

    @pytest.mark.parametrize("value", [[[1, 2]], ((1, 2),), [[True, False]]])
    def test_python_ints_and_bools_are_fine_for_float_inputs(self, value: Any) -> None:
        """A literal list of ints or bools given to a float input is cast to it."""
        out = spec_of("float32").normalize(value)["x"]
        assert out.dtype == np.float32
        np.testing.assert_array_equal(out, np.asarray(value, dtype=np.float32))

    def test_python_floats_are_not_cast_to_int(self) -> None:
        """A literal list of floats given to an int input is refused."""
        with pytest.raises(InvalidInput, match=r"expected int64 with shape \(N, 2\), got float64"):
            spec_of("int64").normalize([[1.5, 2.0]])

    def test_python_ints_fit_checked_for_narrow_ints(self) -> None:
        """A literal list of ints for an int8 input is range-checked."""
        assert spec_of("int8").normalize([[1, -2]])["x"].dtype == np.int8
        with pytest.raises(InvalidInput, match="do not fit int8"):
            spec_of("int8").normalize([[1, 1000]])

    @pytest.mark.parametrize("value", [np.array([["a", "b"]]), [["a", "b"]], np.array([[b"a", b"b"]])])
    def test_strings_are_not_numbers(self, value: Any) -> None:
        """A string array for a numeric input is refused as 'string'."""
        with pytest.raises(
            InvalidInput,
            match=r"expected float32 with shape \(N, 2\), "
            r"got string with shape \(1, 2\)",
        ):
            spec_of("float32").normalize(value)

    def test_object_arrays_are_refused_for_numeric_inputs(self) -> None:
        """An object array for a numeric input is refused even if it holds numbers."""
        with pytest.raises(InvalidInput, match=r"expected float32 with shape \(N, 2\), got object"):
            spec_of("float32").normalize(np.array([[1.0, 2.0]], dtype=object))

    @pytest.mark.parametrize(
        "value",
        [
            np.array([["a"], ["bc"]]),
            np.array([[b"a"], [b"bc"]]),
            np.array([["a"], ["bc"]], dtype=object),
            [["a"], ["bc"]],
        ],
    )
    def test_string_inputs_take_str_bytes_and_object(self, value: Any) -> None:
        """A string input takes U, S and O arrays and lists, as object dtype."""
        out = spec_of(object, (None, 1)).normalize(value)["x"]
        assert out.dtype == np.dtype(object)
        assert out.shape == (2, 1)

    def test_string_inputs_refuse_numbers(self) -> None:
        """A numeric array for a string input is refused."""
        with pytest.raises(
            InvalidInput,
            match=r"expected string \(object\) with shape \(N, 1\), got int64",
        ):
            spec_of(object, (None, 1)).normalize(np.zeros((2, 1), np.int64))

    @given(
        data=st.data(),
        src=st.sampled_from(["float16", "float32", "float64", ">f8"]),
        dst=st.sampled_from(["float16", "float32", "float64"]),
        dims=st.lists(st.integers(0, 3), max_size=3),
        dynamic=st.lists(st.booleans(), min_size=3, max_size=3),
    )
    def test_float_family_round_trips_values(
        self,
        data: st.DataObject,
        src: str,
        dst: str,
        dims: list[int],
        dynamic: list[bool],
    ) -> None:
        """A valid float request normalizes to the spec dtype with equal values."""
        spec_shape = (
            None,
            *(None if dyn else d for d, dyn in zip(dims, dynamic, strict=False)),
        )
        shape = (data.draw(st.integers(1, 4)), *dims)
        # float16 values are exact in every float dtype, so no cast may change one.
        base = data.draw(hnp.arrays(np.float16, shape, elements=st.floats(width=16)))
        x = base.astype(src)
        out = spec_of(dst, spec_shape).normalize(x)["x"]
        assert out.dtype == np.dtype(dst)
        assert out.shape == x.shape
        np.testing.assert_array_equal(out, x)
        if np.dtype(src) == np.dtype(dst):
            assert out is x


class TestHostileArrays:
    """What one caller's array may carry into a batch that others share (hostile probe 4)."""

    @pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
    @pytest.mark.parametrize("normalize", [spec_of("float64").normalize, normalize_untyped], ids=["typed", "untyped"])
    def test_an_ndarray_subclass_becomes_a_plain_array_over_the_same_memory(self, normalize: Any) -> None:
        """An np.matrix joined into a batch made the whole batch a matrix (x ** 2 a matrix power for all)."""
        for value in (
            np.matrix([[1.0, 2.0]]),
            np.ma.masked_array([[1.0, 2.0]]),
            np.ma.masked_array([[1.0, 2.0]], [[0, 0]]),
        ):
            out = next(iter(normalize(value).values()))
            assert type(out) is np.ndarray
            assert np.shares_memory(out, value)

    @pytest.mark.parametrize("normalize", [spec_of("float64").normalize, normalize_untyped], ids=["typed", "untyped"])
    def test_a_masked_array_with_masked_values_is_refused(self, normalize: Any) -> None:
        """Its mask would be dropped: masked values computed as if they were data."""
        with pytest.raises(InvalidInput, match="masked array with masked values"):
            normalize(np.ma.masked_array([[1.0, 2.0]], mask=[[0, 1]]))

    @pytest.mark.parametrize("item", [1, None, 1.5, object(), type("Text", (str,), {})("s")])
    def test_a_string_input_takes_only_str_and_bytes(self, item: object) -> None:
        """An object array of anything passed: the ONNX backend then ran str() of each on the replica's worker
        (a __str__ that failed once made a healthy replica look faulty; five such requests ejected it)."""
        value = np.array([["ok"], [b"ok"], [item]], dtype=object)
        two = Signature([TensorSpec("x", object, (None, 1)), TensorSpec("y", "f4", (None,))])
        for sig, request in ((spec_of(object, (None, 1)), value), (two, {"x": value, "y": np.zeros(3, np.float32)})):
            with pytest.raises(InvalidInput, match="holding objects other than str or bytes"):
                sig.normalize(request)
        texts = value[:2]
        assert spec_of(object, (None, 1)).normalize(texts)["x"] is texts
        numpys = np.array([[np.str_("a")], [np.bytes_(b"b")]], dtype=object)  # NumPy's own scalars are strings too
        assert spec_of(object, (None, 1)).normalize(numpys)["x"] is numpys
        assert normalize_untyped(numpys)[SINGLE] is numpys

    def test_a_structured_dtype_holding_objects_is_refused_untyped(self) -> None:
        """Only dtype object was checked: a structured dtype's object fields passed (and escaped the memory bound)."""
        with pytest.raises(InvalidInput, match=r"dtype \[\('a', 'O'\)\] holding other objects"):
            normalize_untyped(np.array([[(object(),)]], dtype=[("a", object)]))


class TestFromOnnx:
    def test_reads_names_dtypes_and_dims(self) -> None:
        """A symbolic batch dim and fixed feature dims become (None, n) specs."""
        session = session_for(
            [
                helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
                helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 3]),
            ]
        )
        sig = Signature.from_onnx(session)
        assert sig.inputs == (
            TensorSpec("x", "float32", (None, 4)),
            TensorSpec("ids", "int64", (None, 3)),
        )
        assert sig.outputs == (
            TensorSpec("x_out", "float32", (None, 4)),
            TensorSpec("ids_out", "int64", (None, 3)),
        )

    def test_normalized_request_runs_on_the_session(self) -> None:
        """What normalize returns is a valid feed for the real session."""
        session = session_for(
            [
                helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
                helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 3]),
            ]
        )
        feed = Signature.from_onnx(session).normalize({"x": np.ones((2, 4)), "ids": [[1, 2, 3], [4, 5, 6]]})
        x_out, ids_out = session.run(None, feed)
        np.testing.assert_array_equal(x_out, np.ones((2, 4), np.float32))
        assert ids_out.dtype == np.int64

    def test_maps_every_tensor_type(self) -> None:
        """Each supported ONNX element type maps to its numpy dtype."""
        expected = {
            TensorProto.FLOAT: "float32",
            TensorProto.DOUBLE: "float64",
            TensorProto.FLOAT16: "float16",
            TensorProto.BOOL: "bool",
            TensorProto.STRING: "object",
            **{getattr(TensorProto, t.upper()): t for t in ("int8", "int16", "int32")},
            **{getattr(TensorProto, t.upper()): t for t in ("int64", "uint8", "uint16")},
            **{getattr(TensorProto, t.upper()): t for t in ("uint32", "uint64")},
        }
        inputs = [helper.make_tensor_value_info(f"i{t}", t, ["n"]) for t in expected]
        sig = Signature.from_onnx(session_for(inputs))
        assert [s.dtype for s in sig.inputs] == [np.dtype(d) for d in expected.values()]

    def test_fixed_batch_and_unknown_dims_become_dynamic(self) -> None:
        """Axis 0 is always None, and an unnamed unknown dim is None too."""
        session = session_for([helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, None, 5])])
        assert session.get_inputs()[0].shape == [1, None, 5]
        assert Signature.from_onnx(session).inputs[0].shape == (None, None, 5)

    def test_rank_zero_input_is_refused(self) -> None:
        """A model input with no batch axis raises ValueError naming it."""
        session = session_for([helper.make_tensor_value_info("scale", TensorProto.FLOAT, [])])
        with pytest.raises(
            ValueError,
            match=r"model input 'scale' has rank 0 \(or a rank ONNX Runtime cannot tell\); inferkit needs a batch axis",
        ):
            Signature.from_onnx(session)

    def test_non_tensor_input_is_refused(self) -> None:
        """A sequence input raises ValueError naming it and its type."""
        seq = helper.make_tensor_sequence_value_info("xs", TensorProto.FLOAT, ["n"])
        with pytest.raises(
            ValueError,
            match=r"model input 'xs' has unsupported type seq\(tensor\(float\)\)",
        ):
            Signature.from_onnx(session_for([seq]))

    def test_non_tensor_output_is_refused_at_load(self) -> None:
        """An output that is no tensor (a sequence) is refused with what to do, not served to fail every request."""
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])
        seq = helper.make_tensor_sequence_value_info("seq", TensorProto.FLOAT, None)
        nodes = [
            helper.make_node("Identity", ["x"], ["y"]),
            helper.make_node("SequenceConstruct", ["x"], ["seq"]),
        ]
        graph = helper.make_graph(nodes, "g", [x], [y, seq])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
        session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        with pytest.raises(ValueError, match=r"model output 'seq' is a seq\(tensor\(float\)\), not a tensor"):
            Signature.from_onnx(session)

    @pytest.mark.parametrize(("dims", "why"), [([], r"has rank 0 \(or a rank ONNX Runtime cannot"), (["N", 2], None)])
    def test_an_output_without_a_batch_axis_is_refused_at_load(self, dims: list[Any], why: str | None) -> None:
        """A scalar output (a sum over the batch) cannot be split per request: refused at load, naming it."""
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])
        s = helper.make_tensor_value_info("s", TensorProto.FLOAT, dims)
        node = (
            helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0)
            if not dims
            else helper.make_node("Identity", ["x"], ["s"])
        )
        model = helper.make_model(
            helper.make_graph([node], "g", [x], [s]), opset_imports=[helper.make_opsetid("", 17)], ir_version=9
        )
        session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        if why is None:
            assert [o.name for o in Signature.from_onnx(session).outputs] == ["s"]
            return
        with pytest.raises(ValueError, match=f"model output 's' {why}"):
            Signature.from_onnx(session)
        with pytest.raises(ValueError, match=f"model output 's' {why}"):
            inferkit.Predictor.from_onnx(model.SerializeToString())

    def test_skl2onnx_default_classifier_is_refused_with_the_fix(self) -> None:
        """skl2onnx's default classifier (ZipMap: a sequence of maps) fails at load, naming zipmap=False."""
        from skl2onnx import to_onnx
        from sklearn.linear_model import LogisticRegression

        rng = np.random.default_rng(0)
        x, labels = rng.normal(size=(40, 3)).astype(np.float32), rng.integers(0, 2, 40)
        onx = to_onnx(LogisticRegression().fit(x, labels), x[:1])
        with pytest.raises(ValueError, match=r"'output_probability' is a seq\(map.*'zipmap': False"):
            inferkit.Predictor.from_onnx(onx.SerializeToString())
        fixed = to_onnx(LogisticRegression().fit(x, labels), x[:1], options={"zipmap": False})
        with inferkit.Predictor.from_onnx(fixed.SerializeToString()) as predictor:
            out = predictor.predict(x[:5])
        assert out["probabilities"].shape == (5, 2)


class TestUntyped:
    def test_bare_array_is_filed_under_single(self) -> None:
        """A bare ndarray comes back uncopied under the SINGLE name."""
        x = np.zeros((2, 3))
        out = normalize_untyped(x)
        assert SINGLE == ""
        assert list(out) == [SINGLE]
        assert out[SINGLE] is x

    def test_list_is_converted_without_casting(self) -> None:
        """A list becomes an ndarray with numpy's own dtype."""
        out = normalize_untyped([[1, 2], [3, 4]])[SINGLE]
        assert out.dtype == np.int64
        assert out.shape == (2, 2)

    def test_mapping_keeps_names_and_arrays(self) -> None:
        """A mapping of str to arrays keeps its names, order and array objects."""
        a, b = np.zeros((2, 1), np.int8), np.array([["p"], ["q"]])
        out = normalize_untyped({"b": b, "a": a})
        assert list(out) == ["b", "a"]
        assert out["a"] is a
        assert out["b"] is b

    def test_scalar_needs_a_batch_axis(self) -> None:
        """A 0-d array is refused with a hint to add a batch axis."""
        with pytest.raises(
            InvalidInput,
            match=r"request: got a 0-d scalar; add a batch axis, e\.g\. \[x\]",
        ):
            normalize_untyped(np.array(3.0))

    def test_python_scalar_is_not_an_array(self) -> None:
        """A bare Python number is refused as not an array."""
        with pytest.raises(
            InvalidInput,
            match=r"request: expected an array \(np.ndarray, list or tuple\), got int",
        ):
            normalize_untyped(3)

    def test_empty_batch_is_rejected(self) -> None:
        """A request needs at least one row."""
        with pytest.raises(InvalidInput, match=r"input 'a': got an empty batch \(0 rows\)"):
            normalize_untyped({"a": np.zeros((0, 3))})

    def test_inputs_need_equal_rows(self) -> None:
        """All named inputs must have the same number of rows."""
        with pytest.raises(InvalidInput, match=r"inputs need equal rows, but 'a' has 1 and 'b' 2"):
            normalize_untyped({"a": [[1]], "b": [[1], [2]]})

    def test_empty_mapping_is_rejected(self) -> None:
        """A mapping with no inputs is refused."""
        with pytest.raises(InvalidInput, match="expected at least one input, got an empty mapping"):
            normalize_untyped({})

    def test_names_must_be_str(self) -> None:
        """A non-str key is refused, showing it."""
        with pytest.raises(InvalidInput, match="input names must be str, got 0"):
            normalize_untyped({0: [1]})

    @pytest.mark.parametrize("value", [np.array([1, None]), [None, 1], np.array([[1.0]], dtype=object)])
    def test_object_arrays_are_refused(self, value: Any) -> None:
        """Object arrays holding anything but bytes and str are refused."""
        with pytest.raises(InvalidInput, match="expected numbers or strings, got dtype object"):
            normalize_untyped(value)

    def test_object_arrays_of_bytes_pass(self) -> None:
        """BYTES as the protocol decodes them (an object array of bytes) pass as they are."""
        x = np.array([[b"\xff"], ["s"]], dtype=object)
        assert normalize_untyped(x)[SINGLE] is x

    @pytest.mark.parametrize("value", [None, "abc", {"a": {"b": 1}}])
    def test_non_arrays_are_refused(self, value: Any) -> None:
        """None, a str, or a nested mapping are not arrays."""
        with pytest.raises(InvalidInput, match="expected an array"):
            normalize_untyped(value)

    def test_string_arrays_are_kept(self) -> None:
        """Arrays of str or bytes pass as they are."""
        assert normalize_untyped([["a", "b"]])[SINGLE].dtype.kind == "U"
        assert normalize_untyped(np.array([[b"a"]]))[SINGLE].dtype.kind == "S"

    def test_a_1d_array_is_refused(self) -> None:
        """Without declared inputs a 1-D array is ambiguous (one sample or many) and refused with the fix."""
        with pytest.raises(InvalidInput, match=r"shape \(3,\).*\[\[1.0, 2.0\]\] for one row"):
            normalize_untyped(np.array([1.0, 2.0, 3.0]))
        with pytest.raises(InvalidInput, match=r"input 'a': got shape \(2,\)"):
            normalize_untyped({"a": [1, 2]})


class TestBatchKey:
    def test_equal_keys_for_concatenable_requests(self) -> None:
        """Requests differing only in rows share a key and concatenate along axis 0."""
        a, b = (
            ONE.normalize(np.zeros((2, 64), np.float32)),
            ONE.normalize(np.ones((5, 64), np.float32)),
        )
        assert batch_key(a) == batch_key(b)
        assert hash(batch_key(a)) == hash(batch_key(b))
        assert np.concatenate([a["x"], b["x"]]).shape == (7, 64)

    @pytest.mark.parametrize(
        "other",
        [
            {"x": np.zeros((2, 3), np.float64)},
            {"x": np.zeros((2, 4), np.float32)},
            {"y": np.zeros((2, 3), np.float32)},
        ],
    )
    def test_dtype_tail_or_name_changes_the_key(self, other: dict[str, Any]) -> None:
        """Another dtype, non-batch shape or input name gives another key."""
        assert batch_key({"x": np.zeros((2, 3), np.float32)}) != batch_key(other)

    def test_input_order_changes_the_key(self) -> None:
        """The same inputs in another mapping order give another key: an untyped model takes them in
        the request's order (a torch module positionally), so the two never share a batch."""
        a, b = np.zeros((1, 2)), np.zeros((1, 3), np.int8)
        assert batch_key(normalize_untyped({"a": a, "b": b})) != batch_key(normalize_untyped({"b": b, "a": a}))
        assert batch_key(normalize_untyped({"a": a, "b": b})) == batch_key(normalize_untyped({"a": a + 1, "b": b}))

    def test_multi_input_key_tracks_every_input(self) -> None:
        """A change to any one input of several changes the key."""
        base: dict[str, np.ndarray[Any, Any]] = {
            "x": np.zeros((2, 4), np.float32),
            "ids": np.zeros((2, 3), np.int64),
        }
        assert batch_key(base) != batch_key({**base, "ids": np.zeros((2, 2), np.int64)})

    def test_rows_counts_axis_zero(self) -> None:
        """rows() is the length of axis 0 of the first array."""
        assert rows(TWO.normalize({"x": np.zeros((3, 4)), "ids": np.zeros((3, 3), np.int32)})) == 3
        assert type(rows(normalize_untyped([[1], [2]]))) is int

    def test_rows_of_nothing_is_an_error(self) -> None:
        """An empty dict is not a normalized request."""
        with pytest.raises(ValueError, match="rows\\(\\) needs a normalized request"):
            rows({})


def test_public_names() -> None:
    """The module exports exactly its documented public API."""
    assert sorted(signature.__all__) == [
        "SINGLE",
        "Signature",
        "TensorSpec",
        "array_module",
        "batch_key",
        "is_device_array",
        "normalize_untyped",
        "rows",
    ]


def test_the_array_helpers_live_in_arrays_and_signature_re_exports_them() -> None:
    """``inferkit.arrays`` owns the helpers over a normalized request's arrays; the names
    ``inferkit.signature`` always exported are the same functions."""
    from inferkit import arrays

    assert sorted(arrays.__all__) == [
        "array_module",
        "batch_key",
        "copied",
        "device_cast",
        "distinct",
        "is_device_array",
        "rows",
    ]
    for name in ("array_module", "batch_key", "is_device_array", "rows"):
        assert getattr(signature, name) is getattr(arrays, name)
