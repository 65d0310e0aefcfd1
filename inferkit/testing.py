"""Test doubles for code that uses inferkit: a scriptable model and an event recorder.

Test your own service against a real :class:`~inferkit.Predictor` (real batching, real threads)
without a model file, and steer the model from the test::

    import numpy as np
    from inferkit import BatchDone, ModelError, Predictor, TensorSpec
    from inferkit.testing import FakeModel, RecordingObserver

    model = FakeModel(lambda x: x * 2, inputs=[TensorSpec("x", np.float32, (None, 4))])
    events = RecordingObserver()
    with Predictor(model.factory, observers=[events]) as predictor:
        model.pause()  # calls wait at their start: later requests queue up behind them
        future = predictor.submit(np.ones((1, 4), np.float32))
        model.resume()
        assert (future.result(timeout=5) == 2).all()
        model.fail_with(RuntimeError("boom"))  # every call raises until fail_with(None)
        try:
            predictor.predict(np.ones((1, 4), np.float32))
        except ModelError as error:
            print("failed as scripted:", error)
    assert model.calls == 2 and len(events.of_type(BatchDone)) == 2
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import numpy as np

from inferkit.backends.callable import CallableBackend
from inferkit.events import Event
from inferkit.signature import Signature, TensorSpec

__all__ = ["FakeModel", "RecordingObserver"]

Array = np.ndarray[Any, Any]
E = TypeVar("E", bound=Event)


class FakeModel:
    """A model whose behaviour a test sets while it serves; :attr:`factory` makes its replicas.

    ``fn`` computes the outputs from a batch as for :meth:`Predictor.from_callable
    <inferkit.Predictor.from_callable>` (the identity by default); ``inputs`` and ``outputs``
    declare its signature (none: untyped). Every replica shares this object's controls:
    :meth:`pause`/:meth:`resume` hold calls at their start, :meth:`fail_with` makes calls raise,
    :attr:`delay_s` adds latency, and :attr:`calls`, :attr:`rows`, :attr:`batches`,
    :attr:`loads` and :attr:`closes` count what happened. Thread-safe.
    """

    def __init__(
        self,
        fn: Callable[[Any], Any] | None = None,
        *,
        inputs: Iterable[TensorSpec] = (),
        outputs: Iterable[TensorSpec] = (),
        delay_s: float = 0.0,
        keep_batches: bool = True,
    ) -> None:
        inputs = tuple(inputs)
        self.signature: Signature | None = Signature(inputs, tuple(outputs)) if inputs else None
        """The declared signature, or ``None`` for an untyped model."""
        self.delay_s = delay_s
        """Seconds each call sleeps before computing (changeable at any time)."""
        self._fn = fn if fn is not None else _identity
        self._keep = keep_batches
        self._lock = threading.Lock()
        self._running = threading.Event()
        self._running.set()
        self._error: BaseException | None = None
        self._batches: list[dict[str, Array]] = []
        self._calls = self._rows = self._loads = self._closes = 0

    def factory(self) -> _FakeBackend:
        """Load one replica (a :data:`~inferkit.BackendFactory`)."""
        with self._lock:
            self._loads += 1
        return _FakeBackend(self)

    def pause(self) -> None:
        """Hold every call that starts from now on until :meth:`resume`."""
        self._running.clear()

    def resume(self) -> None:
        """Let held and later calls run."""
        self._running.set()

    def fail_with(self, error: BaseException | None) -> None:
        """Make every call raise ``error`` from now on; ``None`` heals the model."""
        with self._lock:
            self._error = error

    @property
    def calls(self) -> int:
        """Model calls (batches) started."""
        with self._lock:
            return self._calls

    @property
    def rows(self) -> int:
        """Rows in every call started."""
        with self._lock:
            return self._rows

    @property
    def batches(self) -> list[dict[str, Array]]:
        """A copy of each call's inputs, in call order (empty with ``keep_batches=False``)."""
        with self._lock:
            return list(self._batches)

    @property
    def loads(self) -> int:
        """Replicas loaded (including replacements)."""
        with self._lock:
            return self._loads

    @property
    def closes(self) -> int:
        """Replicas closed."""
        with self._lock:
            return self._closes

    def _run(self, inputs: Mapping[str, Array]) -> None:
        """Count the call, wait while paused, sleep, raise if failing: the part before computing."""
        rows = len(next(iter(inputs.values())))
        with self._lock:
            self._calls += 1
            self._rows += rows
            if self._keep:
                self._batches.append({name: array.copy() for name, array in inputs.items()})
        self._running.wait()
        if self.delay_s > 0:
            time.sleep(self.delay_s)
        with self._lock:
            error = self._error
        if error is not None:
            raise error

    def _closed(self) -> None:
        with self._lock:
            self._closes += 1


class _FakeBackend(CallableBackend):
    """One replica of a :class:`FakeModel`."""

    def __init__(self, model: FakeModel) -> None:
        super().__init__(model._fn, model.signature)
        self._model = model

    def run(self, inputs: Mapping[str, Array]) -> Mapping[str, Array]:
        """Obey the model's controls, then compute."""
        self._model._run(inputs)
        return super().run(inputs)

    def close(self) -> None:
        """Count the close."""
        self._model._closed()


def _identity(x: Any) -> Any:
    return x


class RecordingObserver:
    """An :class:`~inferkit.Observer` that keeps every event it is given, in order. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: list[Event] = []

    def __call__(self, event: Event) -> None:
        """Record ``event``."""
        with self._lock:
            self._events.append(event)

    @property
    def events(self) -> list[Event]:
        """A copy of every event so far."""
        with self._lock:
            return list(self._events)

    def of_type(self, kind: type[E]) -> list[E]:
        """The events of one type (e.g. :class:`~inferkit.BatchDone`), in order."""
        with self._lock:
            return [e for e in self._events if isinstance(e, kind)]

    def clear(self) -> None:
        """Forget the events so far."""
        with self._lock:
            self._events.clear()
