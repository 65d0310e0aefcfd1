"""A PyTorch ``nn.Module`` as a backend (the ``torch`` extra)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from inferkit.backends.device import device_id
from inferkit.errors import ModelError
from inferkit.signature import SINGLE, Signature, TensorSpec

__all__ = ["TorchBackend"]


class TorchBackend:
    """Runs ``module`` in eval and inference mode on ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:N"``).

    The module is called with one tensor per input, in ``inputs`` order (positional), and returns
    a tensor, a tuple of tensors (named by ``outputs`` in order) or a dict of tensors.
    ``compile=True`` (or a dict of ``torch.compile`` keywords) compiles it once at load.

    NumPy in, NumPy out; CuPy in, CuPy out: CuPy arrays cross through DLPack without a copy, and
    the module runs on CuPy's current stream (wrapped as a torch ``ExternalStream``) so torch and
    the CuPy kernels before and after it never race.
    """

    def __init__(
        self,
        module: Any,
        *,
        device: str = "cpu",
        inputs: Sequence[TensorSpec] | None = None,
        outputs: Sequence[TensorSpec] = (),
        compile: bool | Mapping[str, Any] = False,  # noqa: A002  (torch's own word)
    ) -> None:
        import torch  # noqa: PLC0415  (optional extra)

        self._torch = torch
        gpu = device_id(device)
        self._device = "cpu" if gpu is None else f"cuda:{gpu}"
        self._tdevice = torch.device(self._device)
        self._signature = Signature(tuple(inputs), tuple(outputs)) if inputs is not None else None
        self._names = tuple(s.name for s in outputs)
        module = module.to(self._tdevice).eval()
        for parameter in module.parameters():
            parameter.requires_grad_(requires_grad=False)
        if compile:
            module = torch.compile(module, **(dict(compile) if isinstance(compile, Mapping) else {}))
        self.module = module
        self.cpu_threads = torch.get_num_threads() if gpu is None else 0
        """Cores a run keeps busy: torch's intra-op threads (0 on a GPU); see :func:`.base.cpu_threads`."""

    @property
    def signature(self) -> Signature | None:
        """The declared signature, or ``None``."""
        return self._signature

    @property
    def device(self) -> str:
        """``"cpu"`` or ``"cuda:N"``, where the module's parameters live."""
        return self._device

    def run(self, inputs: Mapping[str, Any]) -> Mapping[str, Any]:
        """Run the module on one batch."""
        torch = self._torch
        on_device = not any(isinstance(a, np.ndarray) for a in inputs.values())
        args = [self._tensor(a) for a in inputs.values()]
        if self._tdevice.type == "cuda" and on_device:
            import cupy  # noqa: PLC0415  (CuPy arrays came in)

            stream = torch.cuda.ExternalStream(cupy.cuda.get_current_stream().ptr, device=self._tdevice)
            with torch.cuda.stream(stream), torch.inference_mode():
                result = self.module(*args)
        else:
            with torch.inference_mode():
                result = self.module(*args)
        named = self._name(result)
        return {n: self._back(t, on_device=on_device) for n, t in named.items()}

    def _tensor(self, array: Any) -> Any:
        torch = self._torch
        if isinstance(array, np.ndarray):
            # torch refuses to share read-only memory (it warns): such a request is copied once.
            return torch.from_numpy(np.require(array, requirements=["C", "W"])).to(self._tdevice, non_blocking=True)
        return torch.from_dlpack(array)  # CuPy: the same device memory, no copy

    def _back(self, tensor: Any, *, on_device: bool) -> Any:
        if on_device and tensor.is_cuda:
            import cupy  # noqa: PLC0415

            return cupy.from_dlpack(tensor)
        return tensor.detach().cpu().numpy()

    def _name(self, result: Any) -> dict[str, Any]:
        torch = self._torch
        if isinstance(result, torch.Tensor):
            return {self._names[0] if len(self._names) == 1 else SINGLE: result}
        if isinstance(result, Mapping):
            return dict(result)
        if isinstance(result, tuple | list) and len(result) == len(self._names):
            return dict(zip(self._names, result, strict=True))
        msg = (
            f"the module returned {type(result).__name__}; return a tensor, a dict of tensors, or a tuple "
            f"of as many tensors as outputs= names ({len(self._names)})"
        )
        raise ModelError(msg)

    def close(self) -> None:
        """Drop the module (and, on a GPU, the memory torch cached for it)."""
        self.module = None
        if self._tdevice.type == "cuda":
            self._torch.cuda.empty_cache()
