"""The models a server answers for: names, versions, metadata, and the one call into them.

The REST and gRPC faces both go through :meth:`Repository.infer`, so requests from either
protocol are batched together by the same Predictor (or split by the same Router).

Messages about unknown models and versions start with Triton's words (clients match on them):
``Request for unknown model: 'm' is not found``, ``Request for unknown model: 'm' version 3 is
not found``, ``failed to get model version from specified version string 'v'``, and, for a model
that was unloaded, ``Request for unknown model: 'm' has no available versions``.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Iterable, Iterator, Mapping
from concurrent.futures import Future
from typing import Any

import attrs
import numpy as np

from inferkit._bridge import await_future
from inferkit._closing import close_all
from inferkit.errors import Closed, InferkitError, ModelNotFound
from inferkit.predictor import Predictor
from inferkit.routing import Predictive, RoutedFuture, Router, ready_of, signature_of
from inferkit.server.protocol import datatype_of
from inferkit.server.served_model import ServedModel, check_name, walk_model
from inferkit.server.submission import heavy, submit, submitted
from inferkit.server.triton_shapes import (
    dynamic_batching,
    instance_groups,
    predictors_behind,
    split_stats,
    triton_stats,
    triton_tensor,
)
from inferkit.stats import Stats

__all__ = ["Failed", "InferResult", "Repository", "ServedModel", "check_name"]

Array = np.ndarray[Any, Any]
_DEFAULT_OUTPUT = "output"  # the name of an unnamed single output (an untyped callable's)


@attrs.frozen
class InferResult:
    """Outputs by name, the arm that served them (None without a Router) and the version asked for."""

    outputs: dict[str, Array]
    arm: str | None
    version: str | None


class Failed(Exception):
    """A request that failed: ``error`` says why, ``arm`` names the Router arm that had it (``None`` without one).

    The faces unwrap it: the answer and the metrics come from ``error``, the ``arm`` goes to the
    ``inferkit-arm`` header (REST) or trailer (gRPC) and the ``arm`` label. ``error`` is an
    :class:`~inferkit.InferkitError`, except out of the server's pipeline
    (:mod:`inferkit.server.pipeline`), where a bug's own exception rides in it too (a 500).
    A refusal at the door (a full queue, a closing model) has no arm: a Router names the
    arm on the future it returns, and a refused request gets none.
    """

    def __init__(self, error: Exception, arm: str | None) -> None:
        super().__init__(error, arm)
        self.error = error
        self.arm = arm


def _version_order(label: str) -> tuple[int, str]:
    return (len(label), label)  # "10" after "9", as the config orders versions


class Repository:
    """The served models, by name.

    Reads are lock-free: every change (:meth:`install`, :meth:`remove`, :meth:`swap_version`)
    builds a new table and replaces the old one in one assignment, under a lock that only
    writers take.
    """

    def __init__(self, models: Iterable[ServedModel] | Mapping[str, Predictive]) -> None:
        if isinstance(models, Mapping):
            models = [ServedModel(name, target) for name, target in models.items()]
        self._models: dict[str, ServedModel] = {m.name: m for m in models}
        if not self._models:
            msg = "a repository needs at least one model"
            raise ValueError(msg)
        self._unloaded: frozenset[str] = frozenset()
        self._write = threading.Lock()
        self._closed = False  # under _write: no change after close, or what it installs is never closed
        self.draining = False
        """Set by a server that is shutting down: readiness turns false at once."""

    def names(self) -> list[str]:
        """Every model name, sorted."""
        return sorted(self._models)

    def unloaded(self) -> list[str]:
        """Models that were unloaded (and not loaded again), sorted."""
        return sorted(self._unloaded)

    def serves(self, name: str) -> bool:
        """Whether a model called ``name`` is served now (a dict lookup: safe on the request path)."""
        return name in self._models

    def model(self, name: str) -> ServedModel:
        """The model called ``name``; ``ModelNotFound`` (in Triton's words) when there is none."""
        models = self._models
        try:
            return models[name]
        except KeyError:
            if name in self._unloaded:
                msg = f"Request for unknown model: {name!r} has no available versions; it was unloaded"
            else:
                msg = f"Request for unknown model: {name!r} is not found; this server has {sorted(models)}"
            raise ModelNotFound(msg) from None

    def resolve(self, name: str, version: str | None = None) -> Predictive:
        """What answers ``name`` (pinned to ``version`` when given)."""
        model = self.model(name)
        if version is None or version == "":
            return model.target
        try:
            return model.versions[version]
        except KeyError:
            known = sorted(model.versions, key=_version_order)
            if version.isascii() and version.isdigit():
                msg = f"Request for unknown model: {name!r} version {version} is not found; it has versions {known}"
            else:
                msg = (
                    f"failed to get model version from specified version string {version!r:.100} "
                    f"(model {name!r} has versions {known})"
                )
            raise ModelNotFound(msg) from None

    # -- changes while serving ---------------------------------------------------------------

    def install(self, model: ServedModel) -> list[Predictive]:
        """Serve ``model`` under its name, replacing what was there; the objects it replaced.

        The caller closes what is returned (a drain: requests they accepted still finish).
        ``Closed`` once the repository is closed (the caller then closes ``model``).
        """
        with self._write:
            self._open()
            old = self._models.get(model.name)
            self._models = {**self._models, model.name: model}
            self._unloaded = self._unloaded - {model.name}
        if old is None:
            return []
        keep = {id(t) for _, t in walk_model(model)}
        return [t for _, t in walk_model(old) if id(t) not in keep]

    def remove(self, name: str) -> ServedModel:
        """Stop serving ``name``; the caller closes what is returned.

        ``ModelNotFound`` if it is not served, ``Closed`` once the repository is closed.
        """
        with self._write:
            self._open()
            old = self.model(name)
            self._models = {k: v for k, v in self._models.items() if k != name}
            self._unloaded = self._unloaded | {name}
        return old

    def swap_version(self, name: str, version: str, predictor: Predictive) -> Predictive:
        """Serve ``predictor`` as ``version`` of ``name`` (a Router's arm too); the one it replaced.

        ``ModelNotFound`` unless ``name`` has that version (``Closed`` after :meth:`close`). The caller
        closes what is returned.
        """
        with self._write:
            self._open()
            model = self.model(name)
            if version not in model.versions:
                self.resolve(name, version)  # raises, in Triton's words
            old = model.versions[version]
            if isinstance(model.target, Router) and version in model.target.arms:
                model.target.swap(version, predictor, close_old=False)
            target = predictor if model.target is old else model.target
            versions = {**model.versions, version: predictor}
            self._models = {**self._models, name: ServedModel(name, target, versions)}
        return old

    def ready(self, name: str | None = None, version: str | None = None) -> bool:
        """Whether one model (or every model) is loaded, warmed and has a healthy replica."""
        if self.draining:
            return False
        if name is None:
            return all(ready_of(m.target) for m in self._models.values())
        return ready_of(self.resolve(name, version))

    def metadata(self, name: str, version: str | None = None) -> dict[str, Any]:
        """The protocol's model metadata: name, versions, platform, inputs and outputs."""
        model, target = self._described(name, version)
        sig = signature_of(target)
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

    def _described(self, name: str, version: str | None) -> tuple[ServedModel, Predictive]:
        """Model ``name`` and what its metadata and config describe: ``version``, else its highest, as Triton's latest.

        Not the unpinned router's own signature, which is its first arm's: versions may differ.
        """
        model = self.model(name)
        target = self.resolve(name, version)
        if not version and model.versions:
            target = model.versions[max(model.versions, key=_version_order)]
        return model, target

    async def infer(
        self,
        name: str,
        version: str | None,
        inputs: dict[str, Array],
        *,
        target: Predictive | None = None,
        key: Hashable | None = None,
        timeout: float | None = None,
        priority: int = 0,
    ) -> InferResult:
        """Run one request; cancelling the awaiting task cancels the request if it is still queued.

        ``target`` is what :meth:`resolve` gave for ``name`` and ``version``, when the caller
        already has it (the server's pipeline resolves once). Every failure, a refusal at the
        door included, raises :class:`Failed`; ``ModelNotFound`` comes as it is.
        """
        if target is None:
            target = self.resolve(name, version)
        try:
            if heavy(inputs):  # admission walks every string: off the event loop
                future = await submitted(target, inputs, key, timeout, priority)
            else:
                future = submit(target, inputs, key, timeout, priority)
        except Closed as closed:
            # A load or unload replaced the target between resolve and submit; a closing
            # predictor refuses at the door, so the request was never accepted: resolve again.
            again = self.resolve(name, version)
            if again is target and not isinstance(target, Router):
                raise Failed(closed, None) from closed
            target = again
            future = _refused_or(target, inputs, key, timeout, priority)
        except InferkitError as refused:
            raise Failed(refused, None) from refused
        arm = future.arm if isinstance(future, RoutedFuture) else None
        try:
            value = await await_future(future)
        except InferkitError as error:
            raise Failed(error, arm) from error
        if isinstance(value, np.ndarray):  # one unnamed output: named as the arm that answered declares it
            answered = target.arms.get(arm, target) if isinstance(target, Router) and arm is not None else target
            sig = signature_of(answered)
            out_name = sig.outputs[0].name if sig is not None and len(sig.outputs) == 1 else _DEFAULT_OUTPUT
            value = {out_name: value}
        return InferResult(dict(value), arm, version)

    def stats(self, name: str | None = None, version: str | None = None, *, split: bool = False) -> dict[str, Any]:
        """Per-model statistics in the shape of Triton's ``/v2/models/{m}/stats``.

        ``split=True`` (the REST face) adds to a routed model's unpinned entry ``split``, each
        arm's share of traffic now, and ``canary``, its state, step and weight; gRPC clients
        parse the entries into Triton's message, which has no such fields.

        Without ``version``, an entry for what answers unpinned requests (version ``""``) and
        one per version. ``queue`` stays zero: inferkit times each request from arrival to
        result (``success``) and each batch's model call (``compute_infer``), and a request's
        share of its batch's call is not recorded, so its queueing time cannot be told apart.
        """
        models = self._models
        names = [name] if name else sorted(models)
        entries = []
        for model_name in names:
            model = self.model(model_name)
            pairs = [(version, self.resolve(model_name, version))] if version else [("", model.target)]
            if not version:
                pairs += sorted(model.versions.items(), key=lambda item: _version_order(item[0]))
            for label, target in pairs:
                entries.append(triton_stats(model_name, label, target))
                if split and not label and isinstance(target, Router):
                    entries[-1].update(split_stats(target))
        return {"model_stats": entries}

    def config(self, name: str, version: str | None = None) -> dict[str, Any]:
        """A Triton-shaped model configuration (the JSON of Triton's ``ModelConfig``).

        Without ``version``, a model with versions shows its highest. ``dims`` leave out the
        batch axis (-1: any size); ``dynamic_batching`` carries ``max_delay_ms`` (as
        microseconds) and ``max_queue_size``; one instance group per device the replicas run on.
        """
        _, target = self._described(name, version)
        predictor = next((p for p in predictors_behind(target) if isinstance(p, Predictor)), None)
        sig = signature_of(target)
        config: dict[str, Any] = {"name": name, "platform": "inferkit", "backend": "inferkit"}
        if predictor is not None:
            config["max_batch_size"] = min(predictor.batching.call_rows, 2**31 - 1)  # an int32
        if sig is not None:
            config["input"] = [triton_tensor(s) for s in sig.inputs]
            config["output"] = [triton_tensor(s) for s in sig.outputs]
        if predictor is not None:
            config["dynamic_batching"] = dynamic_batching(predictor.batching)
            config["instance_group"] = instance_groups(name, predictor)
        return config

    def index(self) -> list[dict[str, str]]:
        """Triton's repository index: every served model (READY or UNAVAILABLE) and every unloaded one."""
        models, unloaded = self._models, self._unloaded
        entries = []
        for name in sorted({*models, *unloaded}):
            model = models.get(name)
            if model is None:
                entries.append({"name": name, "version": "", "state": "UNAVAILABLE", "reason": "unloaded"})
                continue
            versions = sorted(model.versions, key=_version_order) or [""]
            for label in versions:
                target = model.versions.get(label, model.target)
                ready = not self.draining and ready_of(target)
                state, reason = ("READY", "") if ready else ("UNAVAILABLE", "not ready")
                entries.append({"name": name, "version": label, "state": state, "reason": reason})
        return entries

    def walk(self, name: str) -> Iterator[tuple[str, Predictive]]:
        """``(label, object)`` for model ``name``'s target, versions and Router arms, each once.

        A label is the arm path (``outer/inner``), else the version, else ``""``. Arms come
        before versions, so an object that is both is labelled as the arm.
        """
        return walk_model(self.model(name))

    def _targets(self) -> list[Predictive]:
        """Every model object, routers and the predictors behind them, each once."""
        models = self._models
        return list({id(t): t for model in models.values() for _, t in walk_model(model)}.values())

    def predictor_stats(self) -> dict[str, Stats]:
        """Every Predictor's own stats, by predictor name."""
        return {t.name: t.stats() for t in self._targets() if isinstance(t, Predictor)}

    def _open(self) -> None:
        if self._closed:
            msg = "the repository is closed: the server is shutting down"
            raise Closed(msg)

    def close(self, timeout: float | None = None) -> None:
        """Close every model (each object once; a router closes its arms), all within ``timeout``.

        Later changes raise ``Closed``. One deadline for all: each model drains while those before
        it close (each had the whole ``timeout``, so a shutdown took a grace period per busy model).
        One that fails to close leaves none of the others open; its error is raised after (the
        others' as notes on it). A ``KeyboardInterrupt`` (Ctrl-C) while a model drains is raised
        at once: the models after it are closed without waiting (``timeout=0``: what they still
        run or hold ends in ``Closed``), never left to drain one after another first.
        """
        with self._write:
            self._closed = True
        close_all([target.close for target in self._targets()], timeout)


def _refused_or(
    target: Predictive, inputs: dict[str, Array], key: Hashable | None, timeout: float | None, priority: int
) -> Future[Any]:
    """:func:`~inferkit.server.submission.submit`, a refusal raised as :class:`Failed` (it never reached an arm)."""
    try:
        return submit(target, inputs, key, timeout, priority)
    except InferkitError as refused:
        raise Failed(refused, None) from refused
