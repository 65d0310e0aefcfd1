"""The status page's routes: the page and its script, the snapshot, and the OpenAPI document and its page."""

from __future__ import annotations

import html
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import resources
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route

from inferkit.server.repository import Repository
from inferkit.server.status.board import StatusBoard

__all__ = ["openapi", "status_routes"]

_PACKAGE = "inferkit.server.status"  # index.html and status.js ship in the package, beside this module
_NO_STORE = {"cache-control": "no-store"}


# -- OpenAPI ---------------------------------------------------------------------------------

_SUMMARIES = {  # (method, path) -> summary; a route not listed is still documented, by its handler's docstring
    ("GET", "/v2/health/live"): "200 while the process serves",
    ("GET", "/v2/health/ready"): "200 once every model is loaded and warmed, else 503",
    ("GET", "/v2"): "Server metadata (Open Inference Protocol)",
    ("GET", "/metrics"): "Prometheus metrics (text format)",
    ("GET", "/v2/status"): "The status page's snapshot: models, replicas, splits, canaries",
    ("GET", "/v2/openapi.json"): "This document",
    ("GET", "/"): "The status page",
    ("GET", "/docs"): "This document as a page",
}
_TAGS = {"/v2/repository": "repository control", "/v2/models": "models", "/v2/health": "health"}


def openapi(routes: Iterable[BaseRoute], title: str = "inferkit", version: str = "") -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``routes``: the paths an app actually serves, with their methods."""
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        if not isinstance(route, Route) or not route.include_in_schema:
            continue
        doc = (getattr(route.endpoint, "__doc__", None) or "").strip().splitlines()
        for method in sorted((route.methods or set()) - {"HEAD"}):
            summary = _SUMMARIES.get((method, route.path)) or (doc[0] if doc else route.name)
            operation: dict[str, Any] = {
                "summary": summary,
                "operationId": f"{method.lower()}_{route.path}",
                "tags": [next((t for p, t in _TAGS.items() if route.path.startswith(p)), "inferkit")],
                "responses": {"200": {"description": "OK"}},
            }
            params = [
                {"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
                for p in route.param_convertors
            ]
            if params:
                operation["parameters"] = params
            if route.path.endswith("/infer"):
                operation["requestBody"] = {
                    "required": True,
                    "content": {"application/json": {}, "application/octet-stream": {}},
                    "description": "An Open Inference Protocol v2 request (JSON, or with binary tensor data)",
                }
            paths.setdefault(route.path, {})[method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version, "description": "KServe Open Inference Protocol v2 and more"},
        "paths": dict(sorted(paths.items())),
    }


def _docs_page(document: Mapping[str, Any]) -> str:
    """The OpenAPI document as a plain HTML table (no Swagger bundle: nothing to fetch)."""
    rows = []
    for path, operations in document["paths"].items():
        for method, op in operations.items():
            rows.append(
                f"<tr><td class=m>{method.upper()}</td><td><code>{html.escape(path)}</code></td>"
                f"<td>{html.escape(op['summary'])}</td></tr>"
            )
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>inferkit API</title>"
        "<style>body{font:14px system-ui,sans-serif;margin:2em}td{padding:4px 10px;border-bottom:1px solid #ddd}"
        ".m{font-weight:bold}</style></head><body><h1>inferkit REST API</h1>"
        '<p>The machine-readable document: <a href="/v2/openapi.json">/v2/openapi.json</a>. '
        '<a href="/">Status page</a></p>'
        f"<table>{''.join(rows)}</table></body></html>"
    )


def _asset(name: str) -> bytes:
    return resources.files(_PACKAGE).joinpath(name).read_bytes()


def status_routes(repository: Repository, *, page: bool, served: Callable[[], Sequence[BaseRoute]]) -> list[Route]:
    """The routes to add to the REST app: ``/v2/openapi.json`` always, the page's when ``page``.

    ``served`` gives the app's routes once they are all mounted (for the OpenAPI document).
    """
    document: dict[str, Any] = {}

    def build() -> dict[str, Any]:
        if not document:
            from inferkit.server.protocol import server_version  # noqa: PLC0415 (only when asked)

            document.update(openapi(served(), version=server_version()))
        return document

    async def openapi_json(_request: Request) -> Response:
        """The OpenAPI document of the REST endpoints served."""
        return JSONResponse(build())

    routes = [Route("/v2/openapi.json", openapi_json, methods=["GET"])]
    if not page:
        return routes
    board = StatusBoard(repository)
    index, script = _asset("index.html"), _asset("status.js")

    async def status_page(_request: Request) -> Response:
        """The status page."""
        return Response(index, media_type="text/html; charset=utf-8", headers=_NO_STORE)

    async def status_script(_request: Request) -> Response:
        """The status page's script."""
        return Response(script, media_type="text/javascript; charset=utf-8", headers=_NO_STORE)

    async def status(_request: Request) -> Response:
        """The status page's snapshot."""
        # Off the event loop: reading every model's stats is not the loop's work while requests wait.
        body = await run_in_threadpool(board.latest)
        return Response(body, media_type="application/json", headers=_NO_STORE)

    async def docs(_request: Request) -> Response:
        """The OpenAPI document as a page."""
        return HTMLResponse(_docs_page(build()))

    routes += [
        Route("/", status_page, methods=["GET"]),
        Route("/status.js", status_script, methods=["GET"]),
        Route("/v2/status", status, methods=["GET"]),
        Route("/docs", docs, methods=["GET"]),
    ]
    return routes
