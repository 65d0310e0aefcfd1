"""What an arm offers: the :class:`Predictive` protocol that a router's arms (and routers) implement."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any, Protocol, runtime_checkable

from inferkit.signature import Signature

__all__ = ["Predictive", "ready_of", "signature_of"]


@runtime_checkable
class Predictive(Protocol):
    """**Protocol**: what an arm offers; :class:`~inferkit.Predictor` and :class:`~inferkit.Router` both do."""

    @property
    def signature(self) -> Signature | None:
        """The inputs and outputs it takes and gives; ``None`` when it declares none (an untyped callable)."""

    @property
    def ready(self) -> bool:
        """Whether it can serve now (loaded, warmed, a healthy replica): what a readiness probe asks."""

    def predict(self, x: Any, *, timeout: float | None = None, priority: int = 0) -> Any:
        """The result for ``x``."""

    def submit(self, x: Any, *, timeout: float | None = None, priority: int = 0) -> Future[Any]:
        """A future of the result for ``x``."""

    def stats(self) -> Any:
        """A snapshot of the arm's counters."""

    def close(self, timeout: float | None = None) -> None:
        """Finish what was accepted and stop."""


def signature_of(arm: Predictive) -> Signature | None:
    """``arm.signature``; ``None`` for an arm written before :class:`Predictive` declared it."""
    return getattr(arm, "signature", None)


def ready_of(arm: Predictive) -> bool:
    """``arm.ready``; ``True`` for an arm written before :class:`Predictive` declared it."""
    return bool(getattr(arm, "ready", True))
