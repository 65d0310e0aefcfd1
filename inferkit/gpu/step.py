"""What a pipeline step is: the :class:`Kit` it runs with, and the :class:`PreStep` and :class:`PostStep` protocols."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import attrs
import numpy as np

from inferkit.gpu import twins
from inferkit.signature import TensorSpec

Arrays = dict[str, Any]
Specs = dict[str, TensorSpec]


@attrs.frozen
class Kit:
    """Where a step runs: ``ops`` is :mod:`inferkit.gpu.twins` or :mod:`inferkit.gpu.cuda`, ``xp`` NumPy or CuPy."""

    ops: Any
    xp: Any


CPU = Kit(twins, np)
"""The NumPy twins."""


@runtime_checkable
class PreStep(Protocol):
    """**Protocol**: one pre-processing step over the batch's inputs by name."""

    def caller_specs(self, specs: Specs) -> Specs:
        """Given the specs this step must produce, the specs its caller must send."""

    def __call__(self, arrays: Arrays, kit: Kit) -> Arrays:
        """Transform one batch."""


@runtime_checkable
class PostStep(Protocol):
    """**Protocol**: one post-processing step over the batch's outputs by name."""

    def output_specs(self, specs: Specs) -> Specs:
        """Given the specs of the outputs it receives, the specs of what it returns."""

    def __call__(self, arrays: Arrays, kit: Kit) -> Arrays:
        """Transform one batch."""


def _pick(names: Sequence[str], wanted: str | None, role: str, step: str) -> str:
    if wanted is not None:
        if wanted not in names:
            msg = f"{step}: no {role} named {wanted!r}; there are {list(names)}"
            raise ValueError(msg)
        return wanted
    if len(names) != 1:
        msg = f"{step}: there are {len(names)} {role}s {list(names)}; name the one to use with {role}="
        raise ValueError(msg)
    return names[0]
