"""The policy protocol and what it exchanges with the router: a :class:`Route` out, :class:`Feedback` in."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

import attrs


@attrs.frozen
class Route:
    """Where one request goes: the arm that answers it, and an arm to mirror it to, if any."""

    arm: str
    shadow: str | None = None


@attrs.frozen
class Feedback:
    """What the router tells a policy after a request.

    ``kind`` is ``"served"`` (``latency_s``, ``failed``: the model or its replicas failed),
    ``"mirrored"`` (a request was sent to the shadow arm ``arm``, to be compared), ``"shadow"``
    (``agreed``: a mirror's output matched the primary's), ``"mirror_failed"`` (a mirror sent
    was not compared: the mirror, the primary or the comparison failed), a canary
    candidate's model error checked on the baseline (``"checking"`` when sent; then ``"repeated"``,
    the baseline failed the same way: the input's, counted for neither arm, or a ``"served"``
    failure when the baseline served it, or nothing when the check says nothing; last
    ``"checked"``, ``failed`` if it convicted), ``"unchecked"`` (a candidate's model error no check
    was sent for: too many in flight), or ``"outcome"`` (``value``: a business metric the app recorded for
    that arm). Every ``"mirrored"`` ends in
    one ``"shadow"`` or ``"mirror_failed"``, and every ``"checking"`` in one ``"checked"``, perhaps on
    another thread and given to the policy that heard it begin; a policy may ignore kinds it does not use.
    """

    kind: str
    arm: str
    now: float
    latency_s: float = 0.0
    failed: bool = False
    agreed: bool = True
    value: float = 0.0


@runtime_checkable
class Policy(Protocol):
    """**Protocol**: picks an arm for each request and learns from what happened.

    Besides routing, a policy tells the router two things: whether it ``observes`` (reads
    ``"served"`` feedback; the router skips building feedback nobody reads) and its
    :meth:`children`, the policies it wraps, through which the router and the server find a
    :class:`Canary` to drive and show. A wrapper of your own that returns what it wraps from
    ``children()`` works with canary discovery like :class:`Shadow` and :class:`Match` do.
    """

    @property
    def observes(self) -> bool:
        """Whether :meth:`feedback` reads served requests (read once, when the router takes the policy)."""

    def route(self, u: float, attributes: Mapping[str, str]) -> Route:
        """The route for a request at point ``u`` of ``[0, 1)`` with the caller's attributes."""

    def arms(self) -> frozenset[str]:
        """Every arm this policy may route to (checked against the router's arms)."""

    def feedback(self, feedback: Feedback) -> None:
        """Take note of a served request, a shadow comparison or a recorded outcome."""

    def children(self) -> Sequence[Policy]:
        """The policies this one wraps, in the order it consults them; ``()`` for a leaf."""


def children_of(policy: Policy) -> Sequence[Policy]:
    """``policy.children()``; ``()`` for a policy written before the protocol declared it."""
    of = getattr(policy, "children", None)
    return () if of is None else of()


def observes_of(policy: Policy) -> bool:
    """``policy.observes``; ``True`` for a policy written before the protocol declared it (always fed)."""
    return bool(getattr(policy, "observes", True))
