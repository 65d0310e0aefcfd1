"""What the machine gives this process: its cores and its memory, a container's limits included.

A container (Docker, a Kubernetes pod) sees every core and all the memory of its node, while
its cgroup lets it use a few: threads sized from the node's cores are throttled, and buffers
sized from the node's memory are killed. Both read the cgroup, v2 or v1, of the process's own
group (``/proc/self/cgroup``), of each group above it and of the root a container sees, and take
the lowest limit.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

__all__ = ["physical_memory", "usable_cores"]

_CGROUP = Path("/sys/fs/cgroup")
_OWN = Path("/proc/self/cgroup")
_NO_LIMIT = 2**63 - 1
_DEPTH = 32  # groups read down a path, at most (the kernel nests them no deeper in practice)


def _own(own: Path) -> dict[str, str]:
    """The process's cgroup by v1 controller (``""``: cgroup v2), read once from ``own``."""
    groups: dict[str, str] = {}
    with contextlib.suppress(OSError, ValueError):
        for line in own.read_text(errors="replace").splitlines()[:64]:
            fields = line.split(":", 2)
            if len(fields) == 3:  # a malformed line is passed over, not the end of the others
                for controller in fields[1].split(",") if fields[1] else [""]:
                    groups[controller] = fields[2]
    return groups


def _groups(controller: str, cgroup: Path, own: dict[str, str]) -> list[Path]:
    """Directories holding the process's limits for a v1 ``controller`` (``""``: cgroup v2).

    The root, the process's own group and every group between: the kernel enforces each
    ancestor's limit too (a systemd slice's, a pod's above its container's).
    """
    group = cgroup / controller if controller else cgroup
    groups = [group]
    for part in own.get(controller, "/").split("/")[:_DEPTH]:
        if part and part not in {".", ".."}:
            group /= part
            groups.append(group)
    return groups


def _number(path: Path) -> str:
    """The file's text, stripped; empty when it cannot be read."""
    try:
        return path.read_text(encoding="ascii")[:64].strip()
    except (OSError, ValueError):
        return ""


def physical_memory(cgroup: Path = _CGROUP, own: Path = _OWN) -> int:
    """Bytes of memory this process may use: the machine's, or its cgroup's limit where lower.

    cgroup v2's ``memory.max`` or v1's ``memory.limit_in_bytes``; 2^63 - 1 where nothing says.
    """
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not POSIX
        total = _NO_LIMIT
    groups = _own(own)
    for controller, name in (("", "memory.max"), ("memory", "memory.limit_in_bytes")):
        for group in _groups(controller, cgroup, groups):
            text = _number(group / name)
            if text.isdigit():  # v2's "max": no limit
                total = min(total, int(text))
    return total


def usable_cores(cgroup: Path = _CGROUP, own: Path = _OWN) -> int:
    """The cores this process may run on, and at most its cgroup's CPU quota (rounded up).

    cgroup v2's ``cpu.max`` (``"150000 100000"``: 1.5 cores, so 2) or v1's ``cpu.cfs_quota_us``
    over ``cpu.cfs_period_us``; no quota (``max``, ``-1``) leaves the cores the process may run on.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    groups = _own(own)
    quotas = [_number(group / "cpu.max").split() for group in _groups("", cgroup, groups)]
    quotas += [
        [_number(g / "cpu.cfs_quota_us"), _number(g / "cpu.cfs_period_us")] for g in _groups("cpu", cgroup, groups)
    ]
    for quota in quotas:
        if len(quota) == 2 and quota[0].isdigit() and quota[1].isdigit() and int(quota[1]) > 0:
            cores = min(cores, max(1, math.ceil(int(quota[0]) / int(quota[1]))))
    return max(1, cores)
