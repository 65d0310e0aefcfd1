"""Shadow traffic: :class:`Shadow` mirrors a fraction of requests to a candidate arm while another policy answers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from inferkit.policies.protocol import Feedback, Policy, Route, observes_of


class Shadow:
    """Mirror a fraction of traffic to ``candidate`` in the background; ``policy`` answers.

    The mirrored request never adds latency or errors to the caller: it goes through a bounded
    queue that drops (and counts) what it cannot take. The router compares the candidate's
    output with the primary's and reports agreement back as feedback, so a wrapped
    :class:`Canary` can guard on disagreement. The mirror is chosen by a hash of ``u`` that is
    independent of the primary split.
    """

    def __init__(self, policy: Policy, candidate: str, fraction: float = 1.0) -> None:
        if not 0.0 < fraction <= 1.0:
            msg = f"fraction must be in (0, 1], got {fraction!r}"
            raise ValueError(msg)
        self.policy = policy
        self.candidate = candidate
        self.fraction = fraction

    def route(self, u: float, attributes: Mapping[str, str]) -> Route:
        """The wrapped policy's arm, mirrored to the candidate for ``fraction`` of requests."""
        primary = self.policy.route(u, attributes)
        mirror = (u * 7919.0) % 1.0 < self.fraction and primary.arm != self.candidate
        return Route(primary.arm, self.candidate if mirror else primary.shadow)

    def arms(self) -> frozenset[str]:
        """The wrapped policy's arms and the candidate."""
        return self.policy.arms() | {self.candidate}

    @property
    def observes(self) -> bool:
        """Whether the wrapped policy reads feedback."""
        return observes_of(self.policy)

    def children(self) -> Sequence[Policy]:
        """The wrapped policy."""
        return (self.policy,)

    def feedback(self, feedback: Feedback) -> None:
        """Passed on to the wrapped policy."""
        self.policy.feedback(feedback)

    def __repr__(self) -> str:
        return f"Shadow({self.policy!r}, {self.candidate!r}, fraction={self.fraction})"
