"""NVIDIA PyTriton serving the benchmark MLP: a real Triton server, ONNX Runtime in the infer function.

Run with the ``.venv-pytriton`` interpreter (``setup_peers.sh`` makes it) and, with a pyenv
Python, ``LD_LIBRARY_PATH=<sys.base_prefix>/lib`` so that Triton's Python backend stub finds
``libpython3.x.so``; ``bench_server.py`` does both. Binds 127.0.0.1 only::

    python pytriton_server.py --model mlp.onnx --http-port 8000 --grpc-port 8001

Model ``mlp``: input ``x`` FP32 ``[-1, 256]``, output ``y`` FP32 ``[-1, 10]``; Triton's dynamic
batcher with ``max_batch_size`` 64 and ``max_queue_delay`` 2 ms feeds a ``@batch`` function that
runs one ``session.run`` per batch. SIGTERM or SIGINT stops Triton and exits.
"""

from __future__ import annotations

import argparse
import logging
import signal
from pathlib import Path

import numpy as np
import onnxruntime as ort
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig


def _session(model: Path, intra_op: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(model), sess_options=options, providers=["CPUExecutionProvider"])


def _stop(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt  # Triton.serve() catches it and stops the server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--name", default="mlp")
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-delay-ms", type=float, default=2.0)
    parser.add_argument("--intra-op", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    session = _session(args.model, args.intra_op)
    input_name = session.get_inputs()[0].name
    output_name = session.get_outputs()[0].name
    session.run(None, {input_name: np.zeros((args.max_batch_size, 256), np.float32)})  # warm up

    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        (y,) = session.run([output_name], {input_name: inputs[input_name]})
        return {output_name: y}

    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=args.http_port,
        grpc_address="127.0.0.1",
        grpc_port=args.grpc_port,
        allow_metrics=False,
        exit_on_error=True,
    )
    signal.signal(signal.SIGTERM, _stop)
    with Triton(config=config) as triton:
        triton.bind(
            model_name=args.name,
            infer_func=infer,
            inputs=[Tensor(name=input_name, dtype=np.float32, shape=(256,))],
            outputs=[Tensor(name=output_name, dtype=np.float32, shape=(10,))],
            config=ModelConfig(
                max_batch_size=args.max_batch_size,
                batcher=DynamicBatcher(max_queue_delay_microseconds=round(args.max_delay_ms * 1000)),
            ),
            strict=True,
        )
        triton.serve()


if __name__ == "__main__":
    main()
