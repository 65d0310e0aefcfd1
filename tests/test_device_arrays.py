"""Device arrays (``__cuda_array_interface__``) through validation and batching, never converted to NumPy.

A stand-in device array runs the CPU half of the CuPy path on any machine: it wraps a NumPy
array, exposes ``__cuda_array_interface__`` and refuses every conversion to NumPy, as CuPy
does, so any host copy on the way fails the test. Its library is a module of its own,
registered under its name, as ``cupy`` would be. The GPU half is in tests/test_gpu_predictor.py.
"""

from __future__ import annotations

import sys
import threading
import types
from typing import Any

import numpy as np
import pytest

from inferkit import BatchConfig, InvalidInput, ModelError, Predictor, Signature, TensorSpec
from inferkit.backends.base import Backend
from inferkit.signature import normalize_untyped

LIBRARY = "inferkit_test_devicelib"
WAIT = 30


class DeviceArray:
    """A device array: NumPy inside, no way out to NumPy."""

    def __init__(self, data: np.ndarray) -> None:
        self._data = np.asarray(data)

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (0, False), "version": 3}

    def __array__(self, *args: object, **kwargs: object) -> np.ndarray:
        msg = "Implicit conversion to a NumPy array is not allowed (as CuPy)"
        raise TypeError(msg)

    @property
    def shape(self) -> tuple[int, ...]:
        return self._data.shape

    @property
    def dtype(self) -> np.dtype[Any]:
        return self._data.dtype

    @property
    def ndim(self) -> int:
        return self._data.ndim

    @property
    def size(self) -> int:
        return self._data.size

    def __getitem__(self, key: Any) -> DeviceArray:
        return DeviceArray(self._data[key])

    def astype(self, dtype: Any, copy: bool = True) -> DeviceArray:
        with np.errstate(over="ignore"):  # CuPy overflows to inf silently
            return DeviceArray(self._data.astype(dtype, copy=copy))

    def min(self) -> DeviceArray:
        return DeviceArray(self._data.min())

    def max(self) -> DeviceArray:
        return DeviceArray(self._data.max())

    def __int__(self) -> int:
        return int(self._data)

    def __bool__(self) -> bool:
        return bool(self._data)

    def __and__(self, other: DeviceArray) -> DeviceArray:
        return DeviceArray(self._data & other._data)

    def __invert__(self) -> DeviceArray:
        return DeviceArray(~self._data)

    def __mul__(self, k: float) -> DeviceArray:
        return DeviceArray(self._data * k)

    def host(self) -> np.ndarray:
        """The data, for the test's own comparisons (a deliberate download)."""
        return self._data


DeviceArray.__module__ = f"{LIBRARY}.core"  # as cupy.ndarray's lives in cupy._core.core


def _library() -> types.ModuleType:
    lib = types.ModuleType(LIBRARY)
    lib.joins = 0  # type: ignore[attr-defined]

    def concatenate(parts: list[DeviceArray]) -> DeviceArray:
        if not all(type(p) is DeviceArray for p in parts):
            msg = "Unsupported type <class 'numpy.ndarray'>"  # CuPy's refusal of a host array
            raise TypeError(msg)
        lib.joins += 1  # type: ignore[attr-defined]
        return DeviceArray(np.concatenate([p.host() for p in parts]))

    lib.concatenate = concatenate  # type: ignore[attr-defined]
    lib.isinf = lambda a: DeviceArray(np.isinf(a.host()))  # type: ignore[attr-defined]
    lib.any = lambda a: DeviceArray(np.any(a.host()))  # type: ignore[attr-defined]
    return lib


@pytest.fixture(name="lib")
def _lib(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    lib = _library()
    monkeypatch.setitem(sys.modules, LIBRARY, lib)
    return lib


def dev(x: Any, dtype: Any = np.float32) -> DeviceArray:
    return DeviceArray(np.asarray(x, dtype))


SIG = Signature([TensorSpec("x", np.float32, (None, 4))], [TensorSpec("y", np.float32, (None, 4))])
TWO = Signature([TensorSpec("x", np.float32, (None, 4)), TensorSpec("n", np.int64, (None, 1))])


class TestNormalize:
    """Signature.normalize and normalize_untyped take device arrays as they are."""

    @pytest.mark.usefixtures("lib")
    def test_an_exact_array_passes_uncopied(self) -> None:
        """A device array of the declared dtype and shape is the very object queued, bare or by name."""
        x = dev(np.ones((2, 4)))
        assert SIG.normalize(x)["x"] is x
        assert SIG.normalize({"x": x})["x"] is x
        n = dev([[1], [2]], np.int64)
        out = TWO.normalize({"x": x, "n": n})
        assert out["x"] is x
        assert out["n"] is n

    @pytest.mark.usefixtures("lib")
    @pytest.mark.parametrize(
        ("value", "message"),
        [
            (dev(np.ones((2, 3))), r"input 'x': expected float32 with shape \(N, 4\), got float32 with shape \(2, 3\)"),
            (dev(np.ones((2, 4)), np.int32), r"expected float32 with shape \(N, 4\), got int32"),
            (dev(np.ones((0, 4))), "got an empty batch"),
            (dev(np.ones(4)), r"add a batch axis"),
        ],
    )
    def test_a_wrong_array_is_refused_from_its_own_attributes(self, value: DeviceArray, message: str) -> None:
        """dtype, shape and rows are read from the device array; the message is NumPy's."""
        with pytest.raises(InvalidInput, match=message):
            SIG.normalize({"x": value})

    @pytest.mark.usefixtures("lib")
    def test_a_cast_within_the_family_runs_on_the_device(self) -> None:
        """float64 to a float32 input, int32 to int64: cast by the array's own astype, still device arrays."""
        out = TWO.normalize({"x": dev(np.full((1, 4), 0.5), np.float64), "n": dev([[7]], np.int32)})
        assert type(out["x"]) is DeviceArray
        assert out["x"].dtype == np.float32
        assert type(out["n"]) is DeviceArray
        assert out["n"].dtype == np.int64
        np.testing.assert_array_equal(out["x"].host(), np.full((1, 4), 0.5, np.float32))

    @pytest.mark.usefixtures("lib")
    def test_overflow_and_out_of_range_are_refused_as_for_numpy(self) -> None:
        """float64 too large for float16, int64 too large for int8: InvalidInput, as the NumPy path says."""
        half = Signature([TensorSpec("x", np.float16, (None, 1))])
        with pytest.raises(InvalidInput, match="values overflow float16"):
            half.normalize(dev([[1e10]], np.float64))
        np.testing.assert_array_equal(half.normalize(dev([[np.inf]], np.float64))["x"].host(), [[np.inf]])
        small = Signature([TensorSpec("x", np.int8, (None, 1))])
        with pytest.raises(InvalidInput, match=r"values 1..300 do not fit int8"):
            small.normalize(dev([[1], [300]], np.int64))

    @pytest.mark.usefixtures("lib")
    def test_untyped(self) -> None:
        """Without a signature a device array, bare or by name, passes as it is."""
        x = dev(np.ones((3, 2)))
        assert normalize_untyped(x)[""] is x
        assert normalize_untyped({"a": x})["a"] is x
        with pytest.raises(InvalidInput, match="got an empty batch"):
            normalize_untyped(dev(np.ones((0, 2))))

    def test_other_objects_are_still_refused(self) -> None:
        """An object that is no array of any kind is still InvalidInput."""
        with pytest.raises(InvalidInput, match=r"expected an array \(np.ndarray, list or tuple\), got object"):
            SIG.normalize(object())


class TestCheckOutputs:
    """Declared outputs that come back as device arrays."""

    @pytest.mark.usefixtures("lib")
    def test_exact_and_cast_outputs(self) -> None:
        """An exact device output is returned as it is; one of a castable dtype is cast on the device."""
        y = dev(np.ones((2, 4)))
        assert SIG.check_outputs({"y": y})["y"] is y
        out = SIG.check_outputs({"y": dev(np.ones((2, 4)), np.float64)})["y"]
        assert type(out) is DeviceArray
        assert out.dtype == np.float32

    @pytest.mark.usefixtures("lib")
    def test_wrong_outputs_are_model_errors(self) -> None:
        """Wrong shape or kind, or an overflowing cast, is a ModelError naming the output."""
        with pytest.raises(ModelError, match=r"output 'y': the model returned float32 with shape \(2, 3\)"):
            SIG.check_outputs({"y": dev(np.ones((2, 3)))})
        with pytest.raises(ModelError, match=r"output 'y': the model returned int64"):
            SIG.check_outputs({"y": dev(np.ones((2, 4)), np.int64)})
        with pytest.raises(ModelError, match="output 'y': values overflow the declared float32"):
            SIG.check_outputs({"y": dev(np.full((1, 4), 1e300), np.float64)})


class OnDevice:
    """A backend on ``cuda:0`` that takes and returns device arrays (as a GPU ORT session or a PipelineBackend)."""

    device = "cuda:0"

    def __init__(self, fn: Any, signature: Signature | None, seen: list[Any], gate: Any = None) -> None:
        self.fn, self.signature, self.seen, self.gate = fn, signature, seen, gate

    def run(self, inputs: dict[str, Any]) -> dict[str, Any]:
        ((_, x),) = inputs.items()
        self.seen.append(x)
        if self.gate is not None and len(self.seen) == 1:
            self.gate()
        return {"y": self.fn(x)}

    def close(self) -> None:
        pass


def _gated(fn: Any, signature: Signature | None = SIG) -> tuple[Predictor, threading.Event, threading.Event, list[Any]]:
    """A predictor whose first batch waits for ``release``, so later requests queue into one batch."""
    entered, release = threading.Event(), threading.Event()
    seen: list[Any] = []

    def gate() -> None:
        entered.set()
        assert release.wait(WAIT)

    def factory() -> Backend:
        return OnDevice(fn, signature, seen, gate)

    predictor = Predictor(factory, signature=signature)
    return predictor, entered, release, seen


class TestBatching:
    """Device requests batched together: joined by their own library, answered as device arrays."""

    @pytest.mark.parametrize("typed", [True, False])
    def test_device_requests_batch_together_and_come_back_on_the_device(
        self, lib: types.ModuleType, typed: bool
    ) -> None:
        """Four queued device requests run as one batch joined by the library's concatenate; each
        caller gets its own rows back as a device array."""
        predictor, entered, release, seen = _gated(lambda x: x * 2, SIG if typed else None)
        with predictor:
            first = predictor.submit(dev(np.zeros((1, 4))))
            assert entered.wait(WAIT)
            xs = [dev(np.full((i + 1, 4), i)) for i in range(4)]
            futures = [predictor.submit(x) for x in xs]
            release.set()
            assert type(first.result(WAIT)) is DeviceArray
            results = [f.result(WAIT) for f in futures]
        assert len(seen) == 2  # the first request, then the four together
        assert type(seen[1]) is DeviceArray
        assert seen[1].shape == (10, 4)
        assert lib.joins == 1
        for i, (x, got) in enumerate(zip(xs, results, strict=True)):
            assert type(got) is DeviceArray, i
            np.testing.assert_array_equal(got.host(), x.host() * 2)

    def test_numpy_and_device_requests_in_one_batch_are_run_apart(self, lib: types.ModuleType) -> None:
        """A batch mixing NumPy and device requests cannot be joined: its requests run in smaller
        batches, and every caller gets its answer in the kind of array it sent."""
        predictor, entered, release, _ = _gated(lambda x: x * 2)
        with predictor:
            first = predictor.submit(np.zeros((1, 4), np.float32))
            assert entered.wait(WAIT)
            xs: list[Any] = [np.full((1, 4), 1, np.float32), dev(np.full((1, 4), 2)), np.full((1, 4), 3, np.float32)]
            futures = [predictor.submit(x) for x in xs]
            release.set()
            first.result(WAIT)
            results = [f.result(WAIT) for f in futures]
        assert [type(r) for r in results] == [np.ndarray, DeviceArray, np.ndarray]
        np.testing.assert_array_equal(results[1].host(), np.full((1, 4), 4))
        np.testing.assert_array_equal(results[2], np.full((1, 4), 6))
        assert lib.joins == 0

    @pytest.mark.usefixtures("lib")
    def test_a_device_output_with_the_wrong_rows_is_a_model_error(self) -> None:
        """The row check applies to device outputs too."""
        with (
            Predictor(lambda: OnDevice(lambda x: x[:1], None, [])) as predictor,
            pytest.raises(ModelError, match=r"output 'y' must have 2 rows \(one per input row\), got \(1, 4\)"),
        ):
            predictor.predict(dev(np.ones((2, 4))))

    @pytest.mark.usefixtures("lib")
    def test_a_device_request_larger_than_a_batch_is_split_and_joined(self) -> None:
        """A device request of more rows than max_batch_size runs in parts whose outputs are joined on the device."""
        with Predictor(lambda: OnDevice(lambda x: x * 2, SIG, []), batching=BatchConfig(max_batch_size=2)) as predictor:
            got = predictor.predict(dev(np.ones((5, 4))))
        assert type(got) is DeviceArray
        np.testing.assert_array_equal(got.host(), np.full((5, 4), 2))
