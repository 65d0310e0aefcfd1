"""Adapters to what lies outside one process: shared canary state in Redis (:mod:`inferkit.integrations.redis`).

Each submodule imports its optional package itself; importing this package imports none.
"""

__all__: list[str] = []
