"""Adapters to what lies outside one process: other engines and shared state.

:mod:`inferkit.integrations.ray` runs past one machine (Ray Data, Ray Serve);
:mod:`inferkit.integrations.redis` shares a canary's state between server processes. Each
submodule imports its optional package itself; importing this package imports none.
"""

__all__: list[str] = []
