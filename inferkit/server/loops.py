"""The event loop a server runs on: :data:`LOOPS` and :func:`run_loop`."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import attrs

from inferkit.server.workers import Workers

__all__ = ["LOOPS", "known_loop", "run_loop"]

T = TypeVar("T")
LOOPS = ("auto", "asyncio", "uvloop")
"""Event loops an ``InferenceServer`` runs on: uvloop when installed (``auto``), or the one named."""


def known_loop(_: object, attribute: attrs.Attribute[Any], value: str) -> None:
    """Attrs validator: ``value`` names one of :data:`LOOPS`."""
    if value not in LOOPS:
        msg = f"{attribute.name} must be one of {LOOPS}, got {value!r}"
        raise ValueError(msg)


def run_loop(main: Coroutine[Any, Any, T], loop: str = "auto") -> T:
    """Run ``main`` to completion on a new event loop: uvloop with ``"auto"`` when it is installed.

    Its default executor is a :class:`~inferkit.server.workers.Workers`: work still running there when
    ``main`` ends (the decode of a request cut off) holds up neither the loop's close nor the exit.
    """
    factory = None
    if loop != "asyncio":
        try:
            import uvloop  # noqa: PLC0415 (optional: part of the server extra where it builds)
        except ImportError:
            if loop == "uvloop":
                raise
        else:
            factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.get_loop().set_default_executor(Workers())
        return runner.run(main)
