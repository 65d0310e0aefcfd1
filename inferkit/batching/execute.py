"""One batch through a backend: concatenate, call, check, split the outputs; bisect on failure.

Runs with no lock held, on a replica's worker or a caller's thread. A model call that raises is
retried on halves of the batch until the failing requests are isolated, so one bad request
never fails its neighbours; a :class:`~inferkit.ReplicaFault` stops that (the replica is
broken, not the requests).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

from inferkit.arrays import array_module, is_device_array
from inferkit.backends.base import Backend, ReplicaFault
from inferkit.batching.request import Inputs, Request
from inferkit.errors import InvalidInput, ModelError

__all__ = ["Outcome", "Ran", "interrupts", "lone_failure", "model_error", "run_batch", "run_one", "try_join"]

Outcome = tuple[Request, Any, BaseException | None]
Ran = tuple[list[Outcome], list[Outcome], bool]  # every outcome, the failed ones, whether the replica faulted


def run_batch(requests: list[Request], backend: Backend, inputs: Inputs | None = None) -> Ran:
    """Every request's outcome, those of them that failed, and whether the backend reported a fault of its own.

    ``inputs``: the batch's inputs already joined (:func:`try_join`), or None to join them here.
    """
    outcomes: list[Outcome] = []
    failed: list[Outcome] = []
    try:
        _run(requests, backend, outcomes, failed, inputs)
    except ReplicaFault as exc:  # what has not run yet is retried elsewhere
        ran = {id(r) for r, _, _ in outcomes}
        rest = [(r, None, exc) for r in requests if id(r) not in ran]
        return outcomes + rest, failed + rest, True
    return outcomes, failed, False


def _run(
    requests: list[Request],
    backend: Backend,
    outcomes: list[Outcome],
    failed: list[Outcome],
    inputs: Inputs | None = None,
) -> None:
    try:
        outputs = _call(requests, backend, inputs)
    except ReplicaFault:
        raise
    except BaseException as exc:  # any model failure is isolated and typed below, SystemExit & co. too
        if interrupts(exc):
            raise
        if len(requests) == 1:
            outcome, _ = lone_failure(requests[0], exc)
            outcomes.append(outcome)
            failed.append(outcome)
            return
        mid = len(requests) // 2
        _run(requests[:mid], backend, outcomes, failed)
        _run(requests[mid:], backend, outcomes, failed)
        return
    outcomes.extend(outputs)


def interrupts(exc: BaseException) -> bool:
    """Whether ``exc``, raised out of a model call, is its caller's interrupt rather than the model's failure.

    Only Ctrl-C on the main thread is (signals reach no other thread): it goes on to the caller.
    Anything else a model raises, ``SystemExit`` or ``GeneratorExit`` included, fails its request
    and leaves the replica serving.
    """
    return isinstance(exc, KeyboardInterrupt) and threading.current_thread() is threading.main_thread()


def lone_failure(request: Request, exc: BaseException) -> tuple[Outcome, bool]:
    """The outcome of a lone request whose model call raised ``exc``, and whether that is the replica's fault."""
    if isinstance(exc, ReplicaFault):
        return (request, None, exc), True
    return (request, None, exc if isinstance(exc, InvalidInput) else model_error(request, exc)), False


def try_join(requests: list[Request]) -> Inputs | None:
    """The batch's inputs joined along the batch axis, or None where they cannot be (``run_batch`` then says why)."""
    try:
        return _join(requests)
    except Exception:  # noqa: BLE001 (run_batch joins again and isolates the request at fault)
        return None


def _join(requests: list[Request]) -> Inputs:
    if len(requests) == 1:
        inputs = requests[0].inputs
        assert inputs is not None
        return inputs
    names = requests[0].inputs or {}
    try:
        return {n: np.concatenate([r.inputs[n] for r in requests]) for n in names}  # type: ignore[index]
    except (TypeError, ValueError):  # device arrays refuse NumPy: join them with their own library
        return _on_device(requests, names)


def run_one(request: Request, backend: Backend) -> Any:
    """A lone request's result: its model call with no join and no split (raises what the call raises)."""
    assert request.inputs is not None
    outputs = _outputs(backend, request.inputs, request.rows)
    if len(outputs) == 1:
        for value in outputs.values():
            return value
    return dict(outputs)


def _call(requests: list[Request], backend: Backend, inputs: Inputs | None) -> list[Outcome]:
    if len(requests) == 1:
        return [(requests[0], run_one(requests[0], backend), None)]
    if inputs is None:
        inputs = _join(requests)
    first = next(iter(inputs.values()), None)  # joined: it has every request's rows
    outputs = _outputs(backend, inputs, first.shape[0] if first is not None else sum(r.rows for r in requests))
    result: list[Outcome] = []
    start = 0
    if len(outputs) == 1:
        (arr,) = outputs.values()
        for r in requests:
            stop = start + r.rows
            result.append((r, arr[start:stop], None))
            start = stop
    else:
        items = list(outputs.items())
        for r in requests:
            stop = start + r.rows
            result.append((r, {k: v[start:stop] for k, v in items}, None))
            start = stop
    return result


def _outputs(backend: Backend, inputs: Inputs, rows: int) -> Mapping[str, Any]:
    """The backend's outputs for ``inputs``, checked: the signature's, and one row out per row in."""
    outputs = backend.run(inputs)
    signature = backend.signature
    if signature is not None:
        outputs = signature.check_outputs(outputs)
    elif not outputs:  # an untyped function's ``{}``: each caller would get an empty dict as its answer
        msg = "the model returned no outputs"
        raise ModelError(msg)
    for name, arr in outputs.items():
        if not isinstance(arr, np.ndarray) or arr.ndim == 0 or arr.shape[0] != rows:
            if is_device_array(arr) and arr.ndim and arr.shape[0] == rows:
                continue  # a device array (CuPy) comes back as the backend returned it
            got = arr.shape if isinstance(arr, np.ndarray) or is_device_array(arr) else type(arr).__name__
            msg = f"output {name!r} must have {rows} rows (one per input row), got {got}"
            raise ModelError(msg)
    return outputs


def _on_device(requests: list[Request], names: Any) -> dict[str, Any]:
    """The batch's inputs joined by their own array library (CuPy's ``concatenate``), never copied to the host.

    Raises the ``TypeError`` it meets where the parts are not all device arrays of one library
    (NumPy and CuPy requests in one batch): the batch is then split and its requests run apart.
    """
    inputs = {}
    for n in names:
        parts = [r.inputs[n] for r in requests]  # type: ignore[index]
        if not is_device_array(parts[0]):
            msg = f"input {n!r}: the requests' arrays cannot be joined (NumPy and device arrays in one batch)"
            raise TypeError(msg)
        inputs[n] = array_module(parts[0]).concatenate(parts)
    return inputs


def model_error(request: Request, exc: BaseException) -> ModelError:
    """The ``ModelError`` a request gets for the model's exception ``exc``."""
    if isinstance(exc, ModelError):
        error = ModelError(f"request {request.id}: {exc}")
    else:
        error = ModelError(f"the model failed on request {request.id}: {type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error
