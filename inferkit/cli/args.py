"""Value types of the command line's options: counts, ports, positive numbers, fractions and lists."""

from __future__ import annotations

import argparse
import contextlib

from inferkit.pool import MAX_REPLICAS


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        msg = f"must be >= 1, got {value}"
        raise argparse.ArgumentTypeError(msg)
    return value


_MAX_PORT = 65535


def _within(text: str, low: int, high: int, what: str = "", *, also: str = "") -> int:
    """``text`` as an int from ``low`` to ``high`` (``also``: what else it may be, already checked)."""
    value = int(text)
    if not low <= value <= high:
        msg = f"must be {what}from {low} to {high}{also}, got {value}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _pool_size(text: str) -> int:
    """A count of replicas: a server's pool is at most :data:`~inferkit.pool.MAX_REPLICAS`."""
    return _within(text, 1, MAX_REPLICAS, "a count ")


def _port(text: str) -> int:
    """A TCP port (0: a free one); the socket would wrap 70000 to 4464, and refuse -5 with a traceback."""
    return _within(text, 0, _MAX_PORT, "a port number ")


def _grpc_port(text: str) -> int:
    """A gRPC port, or exactly -1: REST only (-2 turned gRPC off too, 70000 served on 4464)."""
    if text.strip() == "-1":
        return -1
    return _within(text, 0, _MAX_PORT, "a port number ", also=", or -1 to serve REST only")


def _grpc_listeners(text: str) -> int:
    from inferkit.server.grpc import MAX_LISTENERS  # noqa: PLC0415 (only serve takes it, with the server extra)

    return _within(text, 1, MAX_LISTENERS)


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
