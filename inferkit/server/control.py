"""Loading and unloading models while serving: Triton's model repository extension.

Off unless the operator turns it on (``[server] repository_control = true`` or
``inferkit serve --repository-control``), and then every load and unload must carry the
operator's token: ``Authorization: Bearer <token>`` over HTTP, the ``authorization`` metadata
over gRPC. No token is 401 (UNAUTHENTICATED), a wrong one 403 (PERMISSION_DENIED); tokens are
compared in constant time.

A load of a served model is a hot swap: the new model is built off the event loop, then takes
the name in one step; requests the old one accepted finish there while it drains and closes
(also off the event loop). An unload drains the same way; later requests get Triton's
``Request for unknown model: 'm' has no available versions``. What a load builds is the
:class:`Loader`'s business: :class:`inferkit.server.config.ModelLoader` rebuilds a model of the
config file, with the changes Triton's load parameters allow.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
from collections.abc import Mapping
from typing import Any, Protocol

import attrs

from inferkit.errors import (  # defined in the one error tree; importable here too
    Forbidden,
    InvalidInput,
    LoadFailed,
    ModelNotFound,
    Unauthenticated,
)
from inferkit.routing import Predictive
from inferkit.server.repository import Repository, ServedModel

__all__ = [
    "TOKEN_ENV",
    "Controller",
    "Forbidden",
    "LoadFailed",
    "LoadedVersion",
    "Loader",
    "RepositoryControl",
    "Unauthenticated",
    "load_parameters",
]

TOKEN_ENV = "INFERKIT_ADMIN_TOKEN"  # noqa: S105 (the variable's name, not a secret)
"""The environment variable ``inferkit serve`` reads the repository control token from."""
_MIN_TOKEN_CHARS = 16  # a token short enough to guess is no token
_DISABLED = (
    "explicit model load / unload is not allowed: repository control is off "
    "(enable it with [server] repository_control = true or --repository-control)"
)


@attrs.frozen
class LoadedVersion:
    """What a :class:`Loader` returns to replace one version of a model (a Router's arm too)."""

    version: str
    predictor: Predictive


class Loader(Protocol):
    """Builds a model to load; called on a worker thread (it may take seconds)."""

    def __call__(self, name: str, config: Mapping[str, Any]) -> ServedModel | LoadedVersion:
        """The model ``name`` as ``config`` (Triton's JSON model config, ``{}`` if none) asks.

        Raise ``LoadFailed`` or ``InvalidInput`` to refuse; the message reaches the client.
        """


def _token(_: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, str) or len(value) < _MIN_TOKEN_CHARS or not value.isprintable():
        msg = f"{attribute.name} must be a printable string of at least {_MIN_TOKEN_CHARS} characters"
        raise ValueError(msg)  # never echo the value: it is a secret


@attrs.frozen
class RepositoryControl:
    """Repository control for a server: on or off, the operator's token and the model loader.

    ``enabled=False`` (the default) refuses every load and unload with 403; the index is
    served either way (it changes nothing). ``token`` is required when enabled.
    """

    enabled: bool = False
    token: str | None = attrs.field(default=None, repr=False)
    loader: Loader | None = None

    def __attrs_post_init__(self) -> None:
        if self.enabled:
            if self.token is None:
                msg = f"repository control needs a token (set {TOKEN_ENV})"
                raise ValueError(msg)
            _token(self, attrs.fields(RepositoryControl).token, self.token)

    def authorize(self, header: str | None) -> None:
        """``Forbidden`` when off or the token is wrong, ``Unauthenticated`` when there is none."""
        if not self.enabled or self.token is None:
            raise Forbidden(_DISABLED)
        if not header:
            msg = "repository control needs the operator's token: send 'Authorization: Bearer <token>'"
            raise Unauthenticated(msg)
        scheme, _, given = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            msg = "the repository control token is not valid"
            raise Forbidden(msg)


class Controller:
    """The load and unload operations over one repository, shared by both faces."""

    def __init__(self, repository: Repository, control: RepositoryControl) -> None:
        self.repository = repository
        self.control = control
        self._lock = threading.Lock()  # one change at a time; readers never take it
        # Changes wait their turn here, not each on a thread of the loop's shared pool, where they
        # would hold up the decoding of other clients' large requests.
        self._turn = asyncio.Lock()

    async def load(self, name: str, config: Mapping[str, Any]) -> None:
        """Build ``name`` on a worker thread, then serve it; the model it replaces drains and closes."""
        loader = self.control.loader
        if loader is None:
            msg = f"failed to load {name!r}, failed to poll from model repository: this server has no loader"
            raise LoadFailed(msg)
        async with self._turn:
            await asyncio.to_thread(self._load, loader, name, config)

    def _load(self, loader: Loader, name: str, config: Mapping[str, Any]) -> None:
        with self._lock:
            built = loader(name, config)
            if isinstance(built, LoadedVersion):
                try:
                    old = [self.repository.swap_version(name, built.version, built.predictor)]
                except ModelNotFound:
                    built.predictor.close()
                    raise
            else:
                old = self.repository.install(built)
        for target in old:  # after the swap: requests they accepted finish, new ones go to the new model
            target.close()

    async def unload(self, name: str) -> None:
        """Stop serving ``name``; requests it accepted finish (on a worker thread) before it closes."""
        async with self._turn:
            await asyncio.to_thread(self._unload, name)

    def _unload(self, name: str) -> None:
        with self._lock:
            old = self.repository.remove(name)
        seen: set[int] = set()
        for target in (old.target, *old.versions.values()):
            if id(target) not in seen:
                seen.add(id(target))
                target.close()


def load_parameters(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """The model config of a load request's parameters (plain values); ``InvalidInput`` for others.

    Triton's load takes ``config`` (a JSON model config) and ``file:<path>`` (a model's files);
    inferkit loads models from paths under the operator's directory only, so files are refused.
    """
    config: dict[str, Any] = {}
    for key, value in parameters.items():
        if key == "config":
            if not isinstance(value, str):
                msg = "invalid value type for load parameter 'config', expected string_param."
                raise InvalidInput(msg)
            try:
                parsed = json.loads(value)
            except (ValueError, RecursionError) as error:  # a client's nesting, thousands deep, is its own mistake
                msg = f"failed to parse the load parameter 'config' as JSON: {error}"
                raise InvalidInput(msg) from None
            if not isinstance(parsed, dict):
                msg = "the load parameter 'config' must be a JSON object (a model config)"
                raise InvalidInput(msg)
            config = parsed
        elif key.startswith("file:"):
            msg = (
                f"load parameter {key!r:.100}: model files cannot be uploaded to inferkit; "
                "give a path under the model directory in the config's parameters.path"
            )
            raise InvalidInput(msg)
        else:
            msg = f"unrecognized load parameter {key!r:.100}."
            raise InvalidInput(msg)
    return config
