"""Value types of the command line's options: counts, ports, positive numbers, fractions and lists."""

from __future__ import annotations

import argparse
import contextlib


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        msg = f"must be >= 1, got {value}"
        raise argparse.ArgumentTypeError(msg)
    return value


_MAX_PORT = 65535


def _port(text: str) -> int:
    """A TCP port (0: a free one); the socket would wrap 70000 to 4464, and refuse -5 with a traceback."""
    value = int(text)
    if not 0 <= value <= _MAX_PORT:
        msg = f"must be a port number from 0 to {_MAX_PORT}, got {value}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _grpc_port(text: str) -> int:
    """A gRPC port, or exactly -1: REST only (-2 turned gRPC off too, 70000 served on 4464)."""
    value = int(text)
    if value != -1 and not 0 <= value <= _MAX_PORT:
        msg = f"must be a port number from 0 to {_MAX_PORT}, or -1 to serve REST only, got {value}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _grpc_listeners(text: str) -> int:
    from inferkit.server.grpc import MAX_LISTENERS  # noqa: PLC0415 (only serve takes it, with the server extra)

    value = int(text)
    if not 1 <= value <= MAX_LISTENERS:
        msg = f"must be from 1 to {MAX_LISTENERS}, got {value}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _grace(text: str) -> float:
    """Seconds of a shutdown, as the config's ``grace_s`` takes them."""
    from inferkit.server.config import check_grace  # noqa: PLC0415 (only serve takes it; no server extra needed)

    value: object = text
    with contextlib.suppress(ValueError):
        value = float(text)
    try:
        return check_grace(value, name="")  # "abc" refused by its type, nan and inf by its range
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


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
