"""Closing several parts within one deadline: :func:`close_all`."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence

__all__ = ["close_all"]


def close_all(closers: Sequence[Callable[[float | None], object]], timeout: float | None) -> None:
    """Call each closer with what is left of one ``timeout`` (``None``: no bound), in order.

    One that fails leaves none of the others open: its error is raised once all are closed, the
    others' as notes on it. A ``BaseException`` that is no ``Exception`` (Ctrl-C while a part
    drains) is raised at once, the parts after it closed with ``0`` (without waiting), so that
    an interrupt is never held until every later part has drained.
    """
    end = None if timeout is None else time.monotonic() + timeout
    errors: list[Exception] = []
    for i, close in enumerate(closers):
        try:
            close(None if end is None else max(0.0, end - time.monotonic()))
        except Exception as error:  # noqa: BLE001 (raised below, once every part is closed)
            errors.append(error)
        except BaseException:
            for rest in closers[i + 1 :]:
                with contextlib.suppress(Exception):
                    rest(0.0)
            raise
    if errors:
        for other in errors[1:]:
            errors[0].add_note(f"closing another part failed too: {type(other).__name__}: {other}")
        raise errors[0]
