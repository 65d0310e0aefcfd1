"""Policies that split traffic by a fixed rule.

One arm (:class:`Fixed`), weights (:class:`ABTest`) or a caller attribute (:class:`Match`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from inferkit.policies.protocol import Feedback, Policy, Route, observes_of


def _pick(layout: Sequence[tuple[str, float]], u: float) -> str:
    """The arm whose interval of the cumulative weights holds ``u``."""
    edge = 0.0
    for arm, share in layout:
        edge += share
        if u < edge:
            return arm
    return layout[-1][0]


class Fixed:
    """Every request to one arm."""

    observes = False  # the router skips building feedback nobody reads

    def __init__(self, arm: str) -> None:
        self.arm = arm
        self._route = Route(arm)

    def route(self, u: float, attributes: Mapping[str, str]) -> Route:  # noqa: ARG002 (protocol)
        """Always :attr:`arm`."""
        return self._route

    def arms(self) -> frozenset[str]:
        """The one arm."""
        return frozenset((self.arm,))

    def feedback(self, feedback: Feedback) -> None:
        """Nothing to learn."""

    def children(self) -> Sequence[Policy]:
        """None: a leaf."""
        return ()

    def __repr__(self) -> str:
        return f"Fixed({self.arm!r})"


class ABTest:
    """Split traffic by weight over any number of arms (weights need not sum to 1).

    Arms keep the order given, so with sticky keys changing one weight moves only the keys
    at the boundaries that shift.
    """

    observes = False

    def __init__(self, weights: Mapping[str, float]) -> None:
        if not weights:
            msg = "weights must name at least one arm"
            raise ValueError(msg)
        bad = {arm: w for arm, w in weights.items() if not 0 <= w < math.inf}
        if bad or not sum(weights.values()) > 0:
            msg = f"weights must be finite, >= 0 and not all 0, got {dict(weights)!r}"
            raise ValueError(msg)
        top = max(weights.values())  # scaled first: two weights of 1e308 add up to inf (every share 0)
        total = sum(w / top for w in weights.values())
        self.weights = {arm: w / top / total for arm, w in weights.items()}
        self._layout = tuple(self.weights.items())
        self._routes = {arm: Route(arm) for arm in self.weights}

    def route(self, u: float, attributes: Mapping[str, str]) -> Route:  # noqa: ARG002 (protocol)
        """The arm whose share of ``[0, 1)`` holds ``u``."""
        return self._routes[_pick(self._layout, u)]

    def arms(self) -> frozenset[str]:
        """The weighted arms."""
        return frozenset(self.weights)

    def feedback(self, feedback: Feedback) -> None:
        """Nothing to learn."""

    def children(self) -> Sequence[Policy]:
        """None: a leaf."""
        return ()

    def __repr__(self) -> str:
        return f"ABTest({self.weights!r})"


class Match:
    """Route by a caller attribute before any weights (e.g. internal users to the candidate).

    ``Match("tenant", {"internal": "v2"}, otherwise=ABTest(...))``: a request whose
    ``attributes["tenant"]`` is ``"internal"`` goes to ``v2``; every other request is left to
    ``otherwise``.
    """

    def __init__(self, attribute: str, routes: Mapping[str, str], otherwise: Policy) -> None:
        self.attribute = attribute
        self.routes = dict(routes)
        self.otherwise = otherwise

    def route(self, u: float, attributes: Mapping[str, str]) -> Route:
        """The matched arm, else what ``otherwise`` picks."""
        arm = self.routes.get(attributes.get(self.attribute, ""))
        return Route(arm) if arm is not None else self.otherwise.route(u, attributes)

    def arms(self) -> frozenset[str]:
        """The matched arms and those of ``otherwise``."""
        return frozenset(self.routes.values()) | self.otherwise.arms()

    @property
    def observes(self) -> bool:
        """Whether ``otherwise`` reads feedback."""
        return observes_of(self.otherwise)

    def children(self) -> Sequence[Policy]:
        """``otherwise``."""
        return (self.otherwise,)

    def feedback(self, feedback: Feedback) -> None:
        """Passed on to ``otherwise``."""
        self.otherwise.feedback(feedback)

    def __repr__(self) -> str:
        return f"Match({self.attribute!r}, {self.routes!r}, otherwise={self.otherwise!r})"
