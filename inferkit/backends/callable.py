"""A Python function over NumPy arrays as a backend."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from inferkit.errors import ModelError
from inferkit.signature import SINGLE, Signature

__all__ = ["CallableBackend"]

Array = np.ndarray[Any, Any]


class CallableBackend:
    """Runs ``fn`` on each batch.

    ``fn`` takes one array when the request has one input (whatever its name), otherwise a dict
    of arrays by name, and returns one array or a dict of arrays. Replicas share the GIL: a
    function that spends its time in Python gains nothing from more replicas, one that releases
    the GIL (NumPy, most native libraries) does.
    """

    def __init__(self, fn: Callable[[Any], Any], signature: Signature | None = None) -> None:
        self._fn = fn
        self._signature = signature
        outs = signature.outputs if signature is not None else ()
        self._out_name = outs[0].name if len(outs) == 1 else SINGLE

    @property
    def signature(self) -> Signature | None:
        """The declared signature, or ``None``."""
        return self._signature

    @property
    def device(self) -> str:
        """Always ``"cpu"``: inferkit does not know where a function runs its work."""
        return "cpu"

    def run(self, inputs: Mapping[str, Array]) -> Mapping[str, Array]:
        """Call the function on one batch and name its outputs."""
        arg: Any = next(iter(inputs.values())) if len(inputs) == 1 else dict(inputs)
        out = self._fn(arg)
        if isinstance(out, np.ndarray):
            return {self._out_name: out}
        if isinstance(out, Mapping) and all(isinstance(v, np.ndarray) for v in out.values()):
            return out
        msg = f"the function must return an ndarray or a dict of ndarrays, got {type(out).__name__}"
        raise ModelError(msg)

    def close(self) -> None:
        """Nothing to free."""
