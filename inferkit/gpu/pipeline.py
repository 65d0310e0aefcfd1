"""Pipelines: pre-processing steps before the model and post-processing steps after it.

A :class:`Pipeline` is data: the same object runs on a GPU replica (CUDA kernels, CuPy arrays)
and on a CPU replica (the NumPy twins). Each step declares what it does to the tensor specs, so
a Predictor validates what the *caller* sends (uint8 images) rather than what the model takes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs

from inferkit.errors import PipelineMismatch
from inferkit.gpu.step import Arrays, Kit, PostStep, PreStep, Specs
from inferkit.signature import SINGLE, Signature

__all__ = ["Custom", "Pipeline", "PipelineMismatch"]


@attrs.frozen
class Custom:
    """A user's function as a step, run on the replica's device (CuPy arrays on a GPU, else NumPy).

    It takes one array when there is one tensor, else a dict by name, and returns the same
    forms. What it does to shapes is unknown, so a pipeline with one has no signature on that side.
    """

    fn: Callable[[Any], Any]

    def caller_specs(self, specs: Specs) -> Specs:  # noqa: ARG002  (the protocol's signature)
        """Unknown."""
        return {}

    def output_specs(self, specs: Specs) -> Specs:  # noqa: ARG002
        """Unknown."""
        return {}

    def __call__(self, arrays: Arrays, kit: Kit, names: Sequence[str] = ()) -> Arrays:  # noqa: ARG002
        """Call the function; a bare array it returns takes the one name in ``names`` (or the one it got)."""
        single = len(arrays) == 1
        out = self.fn(next(iter(arrays.values())) if single else dict(arrays))
        if isinstance(out, Mapping):
            return dict(out)
        if len(names) == 1:
            return {names[0]: out}
        return {next(iter(arrays)) if single else SINGLE: out}


def _fit(step: str, specs_of: Callable[[Specs], Specs], specs: Specs) -> Specs:
    try:
        return specs_of(specs)
    except ValueError as error:
        raise PipelineMismatch(step, str(error)) from None


def _steps(value: Any) -> tuple[Any, ...]:
    return tuple(step if isinstance(step, PreStep | PostStep | Custom) else Custom(step) for step in value)


@attrs.frozen
class Pipeline:
    """Steps run per batch on the replica: ``pre`` before the model, ``post`` after it.

    Steps are the built-ins of :mod:`inferkit.gpu` or plain functions (wrapped in :class:`Custom`).
    """

    pre: tuple[Any, ...] = attrs.field(default=(), converter=_steps)
    post: tuple[Any, ...] = attrs.field(default=(), converter=_steps)

    def signature(self, model: Signature | None) -> Signature | None:
        """What callers send and get back, from the model's signature; ``None`` when unknown.

        Raises :class:`PipelineMismatch` (a ``ValueError``) where a step cannot fit the model
        (wrong dtype, layout, size).
        """
        if model is None:
            return None
        # The post side first: the model's outputs are known whatever the pre side does (a Custom pre step
        # returned before this, and post steps that cannot fit the model ran until their first batch).
        outputs: Specs = {s.name: s for s in model.outputs}
        for i, step in enumerate(self.post):
            outputs = _fit(f"post[{i}]", step.output_specs, outputs)
        inputs: Specs = {s.name: s for s in model.inputs}
        for i, step in reversed(list(enumerate(self.pre))):
            inputs = _fit(f"pre[{i}]", step.caller_specs, inputs)
            if not inputs:
                return None
        return Signature(tuple(inputs.values()), tuple(outputs.values()))

    def preprocess(self, arrays: Arrays, kit: Kit, model_inputs: Sequence[str] = ()) -> Arrays:
        """Run the ``pre`` steps on one batch."""
        for step in self.pre:
            arrays = step(arrays, kit, model_inputs) if isinstance(step, Custom) else step(arrays, kit)
        return arrays

    def postprocess(self, arrays: Arrays, kit: Kit) -> Arrays:
        """Run the ``post`` steps on one batch."""
        for step in self.post:
            arrays = step(arrays, kit)
        return arrays

    def __bool__(self) -> bool:
        return bool(self.pre or self.post)
