"""attrs validators shared by every config class, with messages that name the field and show the value."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import attrs

__all__ = ["finite", "fraction", "integer", "is_finite", "number", "optional_positive"]

Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]


def is_finite(value: object) -> bool:
    """A number (an int or float, not a bool) that is finite."""
    # bool is an int subclass: True replicas is a mistake, not 1
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def integer(minimum: int, maximum: int | None = None) -> Validator:
    """An int (not a bool) of at least ``minimum`` (and at most ``maximum``)."""

    def check(_: object, attribute: attrs.Attribute[Any], value: Any) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            msg = f"{attribute.name} must be an int >= {minimum}, got {value!r}"
            raise ValueError(msg)
        if maximum is not None and value > maximum:
            msg = f"{attribute.name} must be an int <= {maximum}, got {value!r}"
            raise ValueError(msg)

    return check


def number(minimum: float, *, inclusive: bool = True) -> Validator:
    """A finite number of at least (or, not ``inclusive``, above) ``minimum``."""
    sign = ">=" if inclusive else ">"

    def check(_: object, attribute: attrs.Attribute[Any], value: Any) -> None:
        if not is_finite(value) or not (value >= minimum if inclusive else value > minimum):
            msg = f"{attribute.name} must be a finite number {sign} {minimum}, got {value!r}"
            raise ValueError(msg)

    return check


def finite(_: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    """A finite number, of any sign (NaN and infinities refused)."""
    if not is_finite(value):
        msg = f"{attribute.name} must be a finite number, got {value!r}"
        raise ValueError(msg)


def optional_positive(_: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    """``None``, or a finite number > 0."""
    if value is not None and (not is_finite(value) or not value > 0):
        msg = f"{attribute.name} must be > 0 or None, got {value!r}"
        raise ValueError(msg)


def fraction(_: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    """A number in (0, 1]."""
    if not is_finite(value) or not 0 < value <= 1:
        msg = f"{attribute.name} must be in (0, 1], got {value!r}"
        raise ValueError(msg)
