"""What a server listens on: the addresses a host names, its REST sockets, the open-file limit, loopback."""

from __future__ import annotations

import contextlib
import ipaddress
import socket

__all__ = ["addresses", "check_free", "endpoint", "listen", "loopback", "open_file_limit", "raise_open_file_limit"]


def open_file_limit() -> int | None:
    """The soft limit on open files of this process; ``None`` where there is none (unlimited, or Windows)."""
    try:
        import resource  # noqa: PLC0415 (POSIX only)
    except ImportError:  # pragma: no cover
        return None
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


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
    return open_file_limit()


def loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine (``127.0.0.1``, ``::1``, ``localhost``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name other than localhost: it may resolve to anything
        return False


def addresses(host: str) -> list[str]:
    """The addresses ``host`` names, each once, in the resolver's order: what both faces bind.

    Both faces bind what this resolver gives: grpc resolved a name itself (``localhost`` to both
    127.0.0.1 and ::1 where this resolver gives 127.0.0.1 only) and uvicorn bound the first
    address, so the two faces listened on different addresses, and a port taken on one of them
    went unnoticed.
    """
    if not host:  # "": every IPv4 address, as ``bind(("", port))`` takes it
        return ["0.0.0.0"]  # noqa: S104 (the caller asked for every interface)
    try:
        found = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        msg = f"cannot resolve host {host!r}: {error.strerror or error}"
        raise OSError(msg) from None
    except UnicodeError as error:  # the IDNA codec: an empty label ("a..b") or one past 63 characters
        msg = f"cannot resolve host {host!r:.300}: {error}"
        raise OSError(msg) from None
    return list(dict.fromkeys(str(info[4][0]) for info in found))


def endpoint(address: str, port: int) -> str:
    """``address:port``, an IPv6 address bracketed."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def listen(host: str, port: int, backlog: int) -> list[socket.socket]:
    """The REST listening sockets, one per address of ``host`` (:func:`addresses`), on one port.

    ``OSError`` naming the address when one cannot be bound (then none is left open). Bound
    here, before anything starts: uvicorn logs a failure and exits the process instead.
    ``port`` 0: the first address picks a port, the others take the same.
    """
    bound: list[socket.socket] = []
    resolved = addresses(host)
    try:
        for address in resolved:
            bound.append(_bind(address, port, backlog, several=len(resolved) > 1))
            port = bound[0].getsockname()[1]
    except OSError:
        for sock in bound:
            sock.close()
        raise
    return bound


def _bind(address: str, port: int, backlog: int, *, several: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and several:  # "::" beside "0.0.0.0": each family its own socket
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address, port))
        sock.listen(backlog)
    except OSError as error:
        sock.close()
        failure = OSError(f"cannot serve REST on {endpoint(address, port)}: {error.strerror or error}")
        failure.errno = error.errno  # EADDRINUSE for a port in use, as the error it replaces
        raise failure from None
    return sock


def check_free(address: str, port: int) -> None:
    """``RuntimeError`` when something listens on ``address:port`` (as grpc raises when it cannot bind)."""
    try:
        for family, kind, proto, _, where in socket.getaddrinfo(address, port, type=socket.SOCK_STREAM):
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no obstacle
                probe.bind(where)
    except OSError as error:
        msg = f"Failed to bind to address {endpoint(address, port)}: {error}"
        raise RuntimeError(msg) from None
