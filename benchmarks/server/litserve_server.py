"""LitServe serving the benchmark MLP with its own batching and ONNX Runtime in ``setup``.

Run with the ``.venv-litserve`` interpreter (``setup_peers.sh`` makes it). Binds 127.0.0.1 only::

    python litserve_server.py --model mlp.onnx --port 8000

``POST /predict`` with ``{"input": [256 floats]}`` answers ``{"output": [10 floats]}``;
``GET /health`` is 200 once the worker has loaded the model. One inference worker, one API
server process; ``max_batch_size=64, batch_timeout=0.002`` (seconds) on the LitAPI.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import litserve as ls
import numpy as np
import onnxruntime as ort


class MLPAPI(ls.LitAPI):
    def __init__(self, model: Path, intra_op: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model_path = model
        self.intra_op = intra_op

    def setup(self, device: str) -> None:  # noqa: ARG002 (CPU only)
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(self.model_path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self.input_name = self.session.get_inputs()[0].name
        self.session.run(None, {self.input_name: np.zeros((self.max_batch_size, 256), np.float32)})  # warm up

    # No annotation on ``request``: LitServe builds the endpoint's schema from it (none: a JSON body).
    def decode_request(self, request, **_: Any) -> np.ndarray:
        return np.asarray(request["input"], dtype=np.float32)

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        return np.stack(inputs)

    def predict(self, x: np.ndarray, **_: Any) -> np.ndarray:
        return self.session.run(None, {self.input_name: x})[0]

    def unbatch(self, output: np.ndarray) -> list[np.ndarray]:
        return list(output)

    def encode_response(self, output: np.ndarray, **_: Any) -> dict[str, Any]:
        return {"output": output.tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-delay-ms", type=float, default=2.0)
    parser.add_argument("--intra-op", type=int, default=1)
    args = parser.parse_args()
    api = MLPAPI(args.model, args.intra_op, max_batch_size=args.max_batch_size, batch_timeout=args.max_delay_ms / 1000)
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1)
    server.run(host="127.0.0.1", port=args.port, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
