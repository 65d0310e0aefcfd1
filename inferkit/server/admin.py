"""Canary control over REST: status, promote, rollback, pause, resume.

Off unless the operator configures an admin token (``INFERKIT_ADMIN_TOKEN``, or ``[server]
admin_token``: the same token as repository control, see :mod:`inferkit.server.control`), and
then every call must carry it: ``Authorization: Bearer <token>``. No token is 401, a wrong
one (or none configured) 403; tokens are compared in constant time.

::

    GET  /v2/admin/models/{m}/canary              the canary's state, step, weight, history, store
    POST /v2/admin/models/{m}/canary/{action}     promote | rollback | pause | resume

A decision goes through the canary's store (a shared one: every process follows within a
second); while that store cannot be reached the answer is 503 and the weight stays.
``inferkit canary status|promote|rollback|pause|resume --url URL MODEL`` calls these.
"""

from __future__ import annotations

import asyncio
import hmac
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from inferkit.errors import (
    InferkitError,
    ModelNotFound,
    NoCanary,  # defined in the one error tree; importable here too
)
from inferkit.policies import Canary, find_canary
from inferkit.routing import Router
from inferkit.server.control import TOKEN_ENV, TOKEN_RULE, Forbidden, Unauthenticated, usable_token
from inferkit.server.repository import Repository

__all__ = ["ACTIONS", "CanaryAdmin", "NoCanary", "routes"]

ACTIONS = ("promote", "rollback", "pause", "resume")
"""What ``POST /v2/admin/models/{m}/canary/{action}`` may ask."""


class CanaryAdmin:
    """The canary operations over one repository, behind the operator's token (``None``: off)."""

    def __init__(self, repository: Repository, token: str | None) -> None:
        if token is not None and not usable_token(token):
            msg = f"the admin token must be {TOKEN_RULE}"
            raise ValueError(msg)  # never echo the value: it is a secret
        self.repository = repository
        self._token = token

    @property
    def enabled(self) -> bool:
        """Whether a token is configured."""
        return self._token is not None

    def authorize(self, header: str | None) -> None:
        """``Forbidden`` when off or the token is wrong, ``Unauthenticated`` when none was sent."""
        if self._token is None:
            msg = f"canary control is off: configure an admin token ({TOKEN_ENV} or [server] admin_token)"
            raise Forbidden(msg)
        if not header:
            msg = "canary control needs the operator's token: send 'Authorization: Bearer <token>'"
            raise Unauthenticated(msg)
        scheme, _, given = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self._token.encode()):
            msg = "the admin token is not valid"
            raise Forbidden(msg)

    def canary(self, name: str) -> Canary:
        """The canary of model ``name``; ``ModelNotFound`` or :class:`NoCanary`."""
        target = self.repository.model(name).target
        canary = find_canary(target.policy) if isinstance(target, Router) else None
        if canary is None:
            msg = f"model {name!r} has no canary"
            raise NoCanary(msg)
        return canary

    def status(self, name: str) -> dict[str, Any]:
        """The canary's status with the model's name."""
        return {"model": name, **self.canary(name).status()}

    def act(self, name: str, action: str) -> dict[str, Any]:
        """Promote, roll back, pause or resume (blocking: a shared store is a network call)."""
        if action not in ACTIONS:
            msg = f"unknown canary action {action!r:.40}; one of {', '.join(ACTIONS)}"
            raise ModelNotFound(msg)
        getattr(self.canary(name), action)()
        return self.status(name)


def routes(repository: Repository, token: str | None, fail: Any) -> list[Route]:
    """The admin routes; ``fail`` turns an :class:`~inferkit.errors.InferkitError` into the face's error response."""
    admin = CanaryAdmin(repository, token)

    async def status(request: Request) -> Response:
        try:
            admin.authorize(request.headers.get("authorization"))
            return JSONResponse(admin.status(request.path_params["model"]))
        except InferkitError as error:
            return fail(error)  # type: ignore[no-any-return]

    async def act(request: Request) -> Response:
        try:
            admin.authorize(request.headers.get("authorization"))
            name, action = request.path_params["model"], request.path_params["action"]
            return JSONResponse(await asyncio.to_thread(admin.act, name, action))
        except InferkitError as error:
            return fail(error)  # type: ignore[no-any-return]

    base = "/v2/admin/models/{model}/canary"
    return [Route(base, status, methods=["GET"]), Route(base + "/{action}", act, methods=["POST"])]
