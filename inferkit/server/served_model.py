"""A model as the server shows it (:class:`ServedModel`), and the names a URL can carry."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import attrs

from inferkit.routing import Predictive, Router

__all__ = ["ServedModel", "check_name", "walk_model"]

_MOST_NAME_BYTES = 1024  # 3 KiB percent-encoded: far inside any request-head limit


def check_name(name: object, what: str = "a model name") -> str:
    """``name`` when a URL's path segment can carry it as it is; ``ValueError`` saying why otherwise.

    A ``/`` splits the segment and ``.`` / ``..`` are resolved away by clients, so a model named
    so would be served but unreachable over REST.
    """
    if not isinstance(name, str) or not name or not name.isprintable() or "/" in name or name in {".", ".."}:
        msg = f"{what} must be a non-empty printable string without '/', and not '.' or '..', got {name!r:.100}"
        raise ValueError(msg)
    if len(name.encode()) > _MOST_NAME_BYTES:  # percent-encoded (x3) in a URL, it must fit a request head
        msg = f"{what} must be at most {_MOST_NAME_BYTES} bytes in UTF-8, got {len(name.encode())}: {name!r:.100}"
        raise ValueError(msg)
    return name


def _model_name(_: object, __: attrs.Attribute[Any], value: object) -> None:
    check_name(value)


def _as_dict(value: Mapping[str, Predictive]) -> dict[str, Predictive]:
    for label in value:
        check_name(label, "a version label")
    return dict(value)


@attrs.frozen
class ServedModel:
    """A model as the server shows it: a name, what answers unpinned requests, and versions.

    ``target`` is a Predictor, or a Router that splits between versions; ``versions`` maps a
    version label to the predictor that ``/versions/{v}`` pins. Names and labels must fit a
    URL's path segment (:func:`check_name`).
    """

    name: str = attrs.field(validator=_model_name)
    target: Predictive
    versions: Mapping[str, Predictive] = attrs.field(factory=dict, converter=_as_dict)


def walk_model(model: ServedModel) -> Iterator[tuple[str, Predictive]]:
    """``(label, object)`` for ``model``'s target, versions and Router arms, each once (arms first)."""
    seen: set[int] = set()
    pending: list[tuple[str, Predictive]] = [("", model.target), *model.versions.items()]
    while pending:
        label, target = pending.pop(0)
        if id(target) in seen:
            continue
        seen.add(id(target))
        yield label, target
        if isinstance(target, Router):
            prefix = f"{label}/" if label else ""
            pending[:0] = [(prefix + arm, inner) for arm, inner in target.arms.items()]
