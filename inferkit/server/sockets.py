"""What a server listens on: its REST socket, the process's open-file limit, loopback addresses."""

from __future__ import annotations

import contextlib
import ipaddress
import socket

__all__ = ["listen", "loopback", "raise_open_file_limit"]


def raise_open_file_limit() -> int | None:
    """Raise this process's soft limit on open files to its hard limit where allowed; the soft limit now.

    ``None`` where there is no such limit (Windows). At the common soft limit of 1,024, idle
    connections alone can use up the descriptors, and then accepting fails for everyone.
    """
    try:
        import resource  # noqa: PLC0415 (POSIX only)
    except ImportError:  # pragma: no cover
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 2**20
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):  # e.g. macOS caps it below an unlimited hard limit
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return None if soft == resource.RLIM_INFINITY else soft


def loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine (``127.0.0.1``, ``::1``, ``localhost``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name other than localhost: it may resolve to anything
        return False


def listen(host: str, port: int, backlog: int) -> socket.socket:
    """The REST listening socket, bound as uvicorn binds it; ``OSError`` naming the address when it cannot be.

    Bound here, before anything starts: uvicorn logs a failure and exits the process instead.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError as error:
        sock.close()
        failure = OSError(f"cannot serve REST on {host}:{port}: {error.strerror or error}")
        failure.errno = error.errno  # EADDRINUSE for a port in use, as the error it replaces
        raise failure from None
    return sock
