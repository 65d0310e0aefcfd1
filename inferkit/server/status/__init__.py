"""The status page of ``inferkit serve``: one JSON snapshot, the page that polls it, and the OpenAPI document.

::

    GET /                  the page (``index.html`` and ``status.js`` ship in this package: no CDN, no build)
    GET /status.js         its script
    GET /v2/status         the snapshot the page polls (:meth:`StatusBoard.snapshot`)
    GET /docs              the OpenAPI document as a page
    GET /v2/openapi.json   the OpenAPI document of the routes the app actually serves (always on)

Nothing here runs per inference request: the snapshot reads the counters every predictor
and router already keep (``stats()``, ``report()``), when it is asked for. Rates (requests/s,
errors/s) come from the counters sampled at each poll, at most once a second, so they cover
the time a page has been open. Canary decisions are recorded by subscribing to each canary
the board meets: a decision is rare, and recording one appends to a bounded deque. Samples
and decisions go with the model or canary they belong to (an unload, a hot swap).

The page offers no admin actions (promote, rollback, load, unload): those stay behind the
operator's token on their own endpoints (see :mod:`inferkit.server.control`); the snapshot
says so with ``"admin": false``.
"""

from inferkit.server.status.board import REFRESH_S, SCHEMA_VERSION, StatusBoard
from inferkit.server.status.routes import openapi, status_routes

__all__ = ["REFRESH_S", "SCHEMA_VERSION", "StatusBoard", "openapi", "status_routes"]
