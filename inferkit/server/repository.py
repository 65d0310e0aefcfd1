"""The models a server answers for: names, versions, metadata, and the one call into them.

The REST and gRPC faces both go through :meth:`Repository.infer`, so requests from either
protocol are batched together by the same Predictor (or split by the same Router).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator, Mapping
from concurrent.futures import Future
from typing import Any

import attrs
import numpy as np

from inferkit.errors import InferkitError, ModelNotFound
from inferkit.predictor import Predictor
from inferkit.routing import Predictive, Router
from inferkit.server._bridge import await_future
from inferkit.server.protocol import datatype_of
from inferkit.signature import Signature
from inferkit.stats import Stats

__all__ = ["InferResult", "Repository", "ServedModel"]

Array = np.ndarray[Any, Any]
_DEFAULT_OUTPUT = "output"  # the name of an unnamed single output (an untyped callable's)


def _as_dict(value: Mapping[str, Predictive]) -> dict[str, Predictive]:
    return dict(value)


@attrs.frozen
class ServedModel:
    """A model as the server shows it: a name, what answers unpinned requests, and versions.

    ``target`` is a Predictor, or a Router that splits between versions; ``versions`` maps a
    version label to the predictor that ``/versions/{v}`` pins.
    """

    name: str
    target: Predictive
    versions: Mapping[str, Predictive] = attrs.field(factory=dict, converter=_as_dict)


@attrs.frozen
class InferResult:
    """Outputs by name, the arm that served them (None without a Router) and the version asked for."""

    outputs: dict[str, Array]
    arm: str | None
    version: str | None


def _signature(target: Predictive) -> Signature | None:
    if isinstance(target, Router):
        return next((_signature(arm) for arm in target.arms.values()), None)
    return getattr(target, "signature", None)


def _ready(target: Predictive) -> bool:
    if isinstance(target, Router):
        return all(_ready(arm) for arm in target.arms.values())
    return bool(getattr(target, "ready", True))


class Repository:
    """The served models, by name. Thread-safe to read; built once at start-up."""

    def __init__(self, models: Iterable[ServedModel] | Mapping[str, Predictive]) -> None:
        if isinstance(models, Mapping):
            models = [ServedModel(name, target) for name, target in models.items()]
        self._models = {m.name: m for m in models}
        if not self._models:
            msg = "a repository needs at least one model"
            raise ValueError(msg)
        self.draining = False
        """Set by a server that is shutting down: readiness turns false at once."""

    def names(self) -> list[str]:
        """Every model name, sorted."""
        return sorted(self._models)

    def model(self, name: str) -> ServedModel:
        """The model called ``name``; ``ModelNotFound`` when there is none."""
        try:
            return self._models[name]
        except KeyError:
            msg = f"unknown model {name!r}; this server has {self.names()}"
            raise ModelNotFound(msg) from None

    def resolve(self, name: str, version: str | None = None) -> Predictive:
        """What answers ``name`` (pinned to ``version`` when given)."""
        model = self.model(name)
        if version is None or version == "":
            return model.target
        try:
            return model.versions[version]
        except KeyError:
            msg = f"model {name!r} has no version {version!r}; it has {sorted(model.versions)}"
            raise ModelNotFound(msg) from None

    def ready(self, name: str | None = None, version: str | None = None) -> bool:
        """Whether one model (or every model) is loaded, warmed and has a healthy replica."""
        if self.draining:
            return False
        if name is None:
            return all(_ready(m.target) for m in self._models.values())
        return _ready(self.resolve(name, version))

    def metadata(self, name: str, version: str | None = None) -> dict[str, Any]:
        """The protocol's model metadata: name, versions, platform, inputs and outputs."""
        model = self.model(name)
        target = self.resolve(name, version)
        sig = _signature(target)
        tensors: dict[str, list[dict[str, Any]]] = {"inputs": [], "outputs": []}
        if sig is not None:
            for key, specs in (("inputs", sig.inputs), ("outputs", sig.outputs)):
                tensors[key] = [
                    {
                        "name": s.name,
                        "datatype": datatype_of(s.dtype),
                        "shape": [-1 if d is None else d for d in s.shape],
                    }
                    for s in specs
                ]
        return {
            "name": name,
            "versions": sorted(model.versions),
            "platform": "inferkit",
            **tensors,
        }

    def output_names(self, name: str, version: str | None = None) -> tuple[str, ...]:
        """The outputs ``name`` declares, in order; empty when it declares none (an untyped callable)."""
        sig = _signature(self.resolve(name, version))
        return () if sig is None else tuple(s.name for s in sig.outputs)

    async def infer(
        self,
        name: str,
        version: str | None,
        inputs: dict[str, Array],
        *,
        key: Hashable | None = None,
        timeout: float | None = None,
        priority: int = 0,
    ) -> InferResult:
        """Run one request; cancelling the awaiting task cancels the request if it is still queued."""
        target = self.resolve(name, version)
        future: Future[Any]
        if isinstance(target, Router):
            future = target.submit(inputs, key=key, timeout=timeout, priority=priority)
        else:
            future = target.submit(inputs, timeout=timeout, priority=priority)
        try:
            value = await await_future(future)
        except InferkitError as error:
            error.arm = getattr(future, "arm", None)  # type: ignore[attr-defined]  # for metrics by arm
            raise
        if isinstance(value, np.ndarray):
            sig = _signature(target)
            out_name = sig.outputs[0].name if sig is not None and len(sig.outputs) == 1 else _DEFAULT_OUTPUT
            value = {out_name: value}
        return InferResult(dict(value), getattr(future, "arm", None), version)

    def stats(self, name: str | None = None, version: str | None = None) -> dict[str, Any]:
        """Per-model statistics in the shape of Triton's ``/v2/models/{m}/stats``."""
        names = [name] if name is not None else self.names()
        entries = []
        for model_name in names:
            model = self.model(model_name)
            pairs = [(version, self.resolve(model_name, version))] if version else [("", model.target)]
            if version is None:
                pairs += list(model.versions.items())
            for label, target in pairs:
                entries.append(_triton_stats(model_name, label, target))
        return {"model_stats": entries}

    def walk(self, name: str) -> Iterator[tuple[str, Predictive]]:
        """``(label, object)`` for model ``name``'s target, versions and Router arms, each once.

        A label is the arm path (``outer/inner``), else the version, else ``""``. Arms come
        before versions, so an object that is both is labelled as the arm.
        """
        model = self.model(name)
        seen: set[int] = set()
        pending: list[tuple[str, Predictive]] = [("", model.target), *model.versions.items()]
        while pending:
            label, target = pending.pop(0)
            if id(target) in seen:
                continue
            seen.add(id(target))
            yield label, target
            if isinstance(target, Router):
                prefix = f"{label}/" if label else ""
                pending[:0] = [(prefix + arm, inner) for arm, inner in target.arms.items()]

    def _targets(self) -> list[Predictive]:
        """Every model object, routers and the predictors behind them, each once."""
        return list({id(t): t for name in self._models for _, t in self.walk(name)}.values())

    def predictor_stats(self) -> dict[str, Stats]:
        """Every Predictor's own stats, by predictor name."""
        return {t.name: t.stats() for t in self._targets() if isinstance(t, Predictor)}

    def close(self, timeout: float | None = None) -> None:
        """Close every model (each object once; a router closes its arms)."""
        for target in self._targets():
            target.close(timeout)


def _triton_stats(name: str, version: str, target: Predictive) -> dict[str, Any]:
    predictors = list(target.arms.values()) if isinstance(target, Router) else [target]
    success = fail = execution = inference = 0
    request_ns = compute_ns = 0
    batch_sizes: dict[int, int] = {}
    for predictor in predictors:
        if not isinstance(predictor, Predictor):
            continue
        s = predictor.stats()
        success += s.completed
        fail += sum(s.failed.values())
        execution += s.batches
        inference += s.rows
        request_ns += int(s.request_seconds * 1e9)
        compute_ns += int(s.compute_seconds * 1e9)
        for size, count in s.batch_sizes.items():
            batch_sizes[size] = batch_sizes.get(size, 0) + count
    return {
        "name": name,
        "version": version,
        "last_inference": 0,
        "inference_count": inference,
        "execution_count": execution,
        "inference_stats": {
            "success": {"count": success, "ns": request_ns},
            "fail": {"count": fail, "ns": 0},
            "queue": {"count": 0, "ns": 0},  # not tracked apart from the request time
            "compute_input": {"count": 0, "ns": 0},
            "compute_infer": {"count": execution, "ns": compute_ns},
            "compute_output": {"count": 0, "ns": 0},
        },
        "batch_stats": [
            {"batch_size": size, "compute_infer": {"count": count, "ns": 0}}
            for size, count in sorted(batch_sizes.items())
        ],
    }
