"""Devices for backends: naming them, placing replicas on them, and typing what goes wrong on them."""

from __future__ import annotations

import re
from collections.abc import Sequence

from inferkit.backends.base import ReplicaFault
from inferkit.errors import (  # defined in the one error tree; importable here too
    DeviceOutOfMemory,
    DeviceUnavailable,
    InferkitError,
)

__all__ = [
    "DeviceFallbackWarning",
    "DeviceLost",
    "DeviceOutOfMemory",
    "DeviceUnavailable",
    "classify",
    "device_id",
    "placement",
    "visible_gpus",
]

_DEVICE = re.compile(r"(cpu|cuda)(?::([0-9]{1,9}))?")  # fullmatch: "cpu\n" and Unicode digits are no device


class DeviceFallbackWarning(RuntimeWarning):
    """A GPU was asked for but the model runs (or pre/post-processing runs) on the CPU instead."""


class DeviceLost(ReplicaFault):
    """The device failed whatever the input (illegal address, launch failure, ECC): the replica is broken."""


def device_id(device: str) -> int | None:
    """``N`` of ``"cuda:N"`` (0 for ``"cuda"``), ``None`` for ``"cpu"``; ``ValueError`` otherwise."""
    match = _DEVICE.fullmatch(device)
    if match is None:
        msg = f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}"
        raise ValueError(msg)
    if match[1] == "cpu":
        if match[2] is not None:
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
        return None
    return int(match[2] or 0)


def visible_gpus() -> int:
    """How many CUDA devices this process sees (0 when neither CuPy nor torch can tell)."""
    try:
        import cupy  # noqa: PLC0415  (optional)

        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # noqa: BLE001, S110  (not installed, no driver, no device: try the next way)
        pass
    try:
        import torch  # noqa: PLC0415  (optional)

        return int(torch.cuda.device_count())
    except Exception:  # noqa: BLE001  (not installed or no driver)
        return 0


def placement(device: str | Sequence[str]) -> tuple[str, ...]:
    """The devices replicas cycle over: replica *i* gets entry ``i mod len``.

    ``"cuda"`` means every visible GPU (``cuda:0`` alone when none can be counted, so that the
    backend reports the failure); ``"cuda:N"`` and ``"cpu"`` one device; a list, itself.
    """
    if isinstance(device, str):
        if device == "cuda":
            return tuple(f"cuda:{i}" for i in range(max(visible_gpus(), 1)))
        device_id(device)
        return (device,)
    devices = tuple(device)
    if not devices:
        raise ValueError("device needs at least one entry, got an empty list")
    for d in devices:
        device_id(d)
    return tuple("cuda:0" if d == "cuda" else d for d in devices)


_OOM = (
    "out of memory",
    "failed to allocate memory",
    "cudaerrormemoryallocation",
    "cuda_error_out_of_memory",
    "bfcarena",
)
_LOST = (
    "illegal memory access",
    "illegal address",
    "unspecified launch failure",
    "launch failure",
    "device-side assert",
    "ecc error",
    "uncorrectable ecc",
    "cudaerrordevicesunavailable",
    "device lost",
    "device has fallen off the bus",
    "cuda_error_illegal_address",
    "cudaerrorlaunchfailure",
    "hardware stack error",
)


def classify(error: BaseException) -> str | None:
    """``"oom"`` for out of device memory, ``"lost"`` for a broken device, else ``None``.

    CuPy, torch and ONNX Runtime raise their own classes (``cupy.cuda.memory.OutOfMemoryError``,
    ``torch.OutOfMemoryError``, ORT's ``RuntimeException`` with CUDA's message), so the class
    name and the message are read rather than the classes imported.
    """
    if isinstance(error, InferkitError | ReplicaFault):
        return None
    name = type(error).__name__
    text = f"{name}: {error}".lower()
    if isinstance(error, MemoryError) or name == "OutOfMemoryError" or any(s in text for s in _OOM):
        return "oom"
    if any(s in text for s in _LOST):
        return "lost"
    return None
