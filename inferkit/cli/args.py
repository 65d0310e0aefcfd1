"""Value types of the command line's options: counts, positive numbers, fractions and lists."""

from __future__ import annotations

import argparse


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        msg = f"must be >= 1, got {value}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _positive(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        msg = f"must be a finite number > 0, got {text}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        msg = f"must be in (0, 1], got {text}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _int_list(text: str) -> tuple[int, ...]:
    values = tuple(_at_least_one(part) for part in text.split(",") if part.strip())
    if not values:
        msg = f"give comma-separated integers >= 1, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return values


def _float_list(text: str) -> tuple[float, ...]:
    values = tuple(float(part) for part in text.split(",") if part.strip())
    if not values or not all(0 <= v < float("inf") for v in values):
        msg = f"give comma-separated numbers >= 0, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return values
