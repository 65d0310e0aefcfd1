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

Changes take turns (one :class:`Controller` serves both faces of a server). When the server
stops, changes still waiting for their turn are refused at once (503 / UNAVAILABLE); the
running one has the grace period like any request, and a model it builds after the repository
closed is closed, never served. Builds run on daemon threads: one still running when the grace
is over does not hold up the process's exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Protocol

import attrs

from inferkit.errors import (  # defined in the one error tree; importable here too
    Closed,
    Forbidden,
    InvalidInput,
    LoadFailed,
    ModelNotFound,
    Unauthenticated,
)
from inferkit.routing import Predictive
from inferkit.server.repository import Repository
from inferkit.server.served_model import ServedModel, check_name

__all__ = [
    "TOKEN_ENV",
    "Controller",
    "Forbidden",
    "LoadFailed",
    "LoadedVersion",
    "Loader",
    "RepositoryControl",
    "Unauthenticated",
    "controller_of",
    "load_parameters",
]

TOKEN_ENV = "INFERKIT_ADMIN_TOKEN"  # noqa: S105 (the variable's name, not a secret)
"""The environment variable ``inferkit serve`` reads the repository control token from."""
_MIN_TOKEN_CHARS = 16  # a token short enough to guess is no token
_STOPPING = "the server is shutting down: no model is loaded or unloaded any more"
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


TOKEN_RULE = f"a printable ASCII string of at least {_MIN_TOKEN_CHARS} characters"
"""What the operator's token must be: HTTP headers and gRPC metadata carry ASCII as it is sent."""


def usable_token(value: object) -> bool:
    """Whether ``value`` can be the operator's token (:data:`TOKEN_RULE`)."""
    return isinstance(value, str) and len(value) >= _MIN_TOKEN_CHARS and value.isascii() and value.isprintable()


def _token(_: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not usable_token(value):
        msg = f"{attribute.name} must be {TOKEN_RULE}"
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


class _Turns:
    """One change at a time, in arrival order; those still waiting are refused at once by :meth:`stop`.

    Used on the serving loop only, so no lock: ``_busy`` is handed from one change to the next.
    """

    def __init__(self) -> None:
        self._busy = False
        self._waiting: deque[asyncio.Future[None]] = deque()
        self.stopped = False

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """Wait for this change's turn (``Closed`` once stopped), hold it for the ``async with`` body."""
        if self.stopped:
            raise Closed(_STOPPING)
        if self._busy:
            mine = asyncio.get_running_loop().create_future()
            self._waiting.append(mine)
            try:
                await mine
            except asyncio.CancelledError:
                if mine.done() and not mine.cancelled() and mine.exception() is None:
                    self._next()  # handed the turn, then cancelled before taking it: pass it on
                elif not mine.done():
                    self._waiting.remove(mine)
                raise
        self._busy = True
        try:
            yield
        finally:
            self._next()

    def _next(self) -> None:
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)  # _busy stays True: the turn is handed over
                return
        self._busy = False

    def stop(self) -> None:
        """Refuse every change still waiting, and every later one."""
        self.stopped = True
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_exception(Closed(_STOPPING))


async def _on_daemon_thread(work: Callable[[], None]) -> None:
    """Run ``work`` on a thread of its own that never holds up the process's exit; await its end.

    Not asyncio's shared pool: its threads are joined at exit, so a build still running when a
    server's grace period is over would keep the process alive until it finished.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def settle(error: BaseException | None) -> None:
        if done.done():  # the awaiting request was cancelled
            return
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)

    def run() -> None:
        error: BaseException | None = None
        try:
            work()
        except BaseException as failure:  # noqa: BLE001 (handed to the awaiting request)
            error = failure
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
            loop.call_soon_threadsafe(settle, error)

    threading.Thread(target=run, name="inferkit-repository-change", daemon=True).start()
    await done


class Controller:
    """The load and unload operations over one repository; a server's two faces share one."""

    def __init__(self, repository: Repository, control: RepositoryControl) -> None:
        self.repository = repository
        self.control = control
        # One change at a time, also when a request that waits for one was cancelled (its thread
        # still runs); readers never take it.
        self._lock = threading.Lock()
        # Changes wait their turn on the loop, not each on a thread of the loop's shared pool,
        # where they would hold up the decoding of other clients' large requests.
        self._turns = _Turns()

    async def load(self, name: str, config: Mapping[str, Any]) -> None:
        """Build ``name`` on a worker thread, then serve it; the model it replaces drains and closes."""
        try:
            check_name(name)
        except ValueError as error:  # a gRPC name, or a REST one the router decoded: served, never reachable
            msg = f"failed to load {name!r:.100}: {error}"
            raise InvalidInput(msg) from None
        loader = self.control.loader
        if loader is None:
            msg = f"failed to load {name!r}, failed to poll from model repository: this server has no loader"
            raise LoadFailed(msg)
        async with self._turns.turn():
            await _on_daemon_thread(lambda: self._load(loader, name, config))

    def _load(self, loader: Loader, name: str, config: Mapping[str, Any]) -> None:
        with self._lock:
            built = loader(name, config)
            try:
                if isinstance(built, LoadedVersion):
                    old = [self.repository.swap_version(name, built.version, built.predictor)]
                else:
                    old = self.repository.install(built)
            except (ModelNotFound, Closed) as error:  # not served (the server may have closed meanwhile): close it here
                for target in _parts(built) if isinstance(built, ServedModel) else [built.predictor]:
                    target.close()
                if isinstance(error, ModelNotFound) and isinstance(built, LoadedVersion):  # a load refused, not a 404
                    msg = f"failed to load {name!r} version {built.version!r}: {error}; load the whole model first"
                    raise LoadFailed(msg) from None
                raise
        for target in old:  # after the swap: requests they accepted finish, new ones go to the new model
            target.close()

    async def unload(self, name: str) -> None:
        """Stop serving ``name``; requests it accepted finish (on a worker thread) before it closes."""
        async with self._turns.turn():
            await _on_daemon_thread(lambda: self._unload(name))

    def _unload(self, name: str) -> None:
        with self._lock:
            old = self.repository.remove(name)
        for target in _parts(old):
            target.close()

    def stop(self) -> None:
        """The server is stopping: refuse every change not yet running (``Closed``), now and later."""
        self._turns.stop()


def _parts(model: ServedModel) -> list[Predictive]:
    """What closing ``model`` closes: its target and versions, each once (a Router closes its arms)."""
    return list({id(t): t for t in (model.target, *model.versions.values())}.values())


def controller_of(repository: Repository, control: RepositoryControl | Controller | None) -> Controller:
    """``control`` itself when it is a :class:`Controller` (one shared by a server's faces), else a new one."""
    if isinstance(control, Controller):
        if control.repository is not repository:
            msg = "a shared Controller must control the repository it is served with"
            raise ValueError(msg)
        return control
    return Controller(repository, control if control is not None else RepositoryControl())


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
