"""GPU benchmark (make bench-gpu): kernels against copy bandwidth, fused vs separate pre-processing,
the GPU Predictor vs raw ONNX Runtime I/O binding, and end-to-end images/s with pre/post on GPU vs CPU.

Ratios are measured in one run on one device; absolute times are printed for context only.
Exits 0 with a message where there is no GPU, CuPy or onnxruntime-gpu (those sections skip).
"""

from __future__ import annotations

import itertools
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _skip(reason: str) -> None:
    print(f"bench-gpu skipped: {reason}")
    sys.exit(0)


try:
    import cupy as cp
except ImportError:
    _skip("CuPy is not installed (pip install -e '.[gpu]')")
try:
    if cp.cuda.runtime.getDeviceCount() < 1:
        _skip("no CUDA GPU is visible")
except Exception as exc:
    _skip(f"no usable CUDA GPU ({type(exc).__name__}: {exc})")

from inferkit.gpu import cuda, twins  # noqa: E402

ROWS: list[tuple[str, str, str]] = []


def gpu_time(fn: Callable[[], Any], repeat: int = 20) -> float:
    """Median seconds of ``fn`` on the current stream, timed with CUDA events after a warm-up."""
    fn()
    cp.cuda.get_current_stream().synchronize()
    times = []
    for _ in range(repeat):
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop) / 1e3)
    return float(np.median(times))


def row(what: str, value: str, note: str = "") -> None:
    ROWS.append((what, value, note))
    print(f"{what:<58} {value:>14}  {note}")


def copy_time(nbytes: int) -> float:
    """Seconds to copy ``nbytes // 2`` bytes on the device (``nbytes`` read + written)."""
    src = cp.empty(nbytes // 2, dtype=cp.uint8)
    dst = cp.empty_like(src)
    return gpu_time(lambda: cp.copyto(dst, src))


def copy_bandwidth() -> float:
    bw = (1 << 31) / copy_time(1 << 31)
    row("device-to-device copy, 1 GiB (read + write)", f"{bw / 1e9:,.0f} GB/s", "the reference for every ratio")
    return bw


def kernels(copy_bw: float) -> None:
    rng = np.random.default_rng(0)
    # Sizes of several hundred MB: small ones measure launches and ramp-up, not bandwidth.
    images = cp.asarray(rng.integers(0, 256, (1024, 224, 224, 3), dtype=np.uint8))
    big = cp.asarray(rng.integers(0, 256, (256, 480, 640, 3), dtype=np.uint8))
    logits = cp.asarray(rng.standard_normal((262144, 1000)).astype(np.float32))
    plan = twins.image_plan((224, 224), None, MEAN, STD)
    resize = twins.image_plan((480, 640), (320, 320), MEAN, STD, letterbox=True)

    def ratio(name: str, fn: Callable[[], Any], nbytes: int, bound: str = "") -> None:
        t = gpu_time(fn)
        r = nbytes / t / copy_bw
        target = bound or ("meets >= 0.7" if r >= 0.7 else "BELOW 0.7 target")
        same = copy_time(nbytes) / t  # a copy of as many bytes: what launch and ramp-up leave at this size
        row(name, f"{r:.2f} of copy", f"{t * 1e3:.3f} ms; {same:.2f} of a copy of the same bytes; {target}")

    n = images.size
    ratio("normalize uint8 NHWC -> f32 NCHW (1024x224x224)", lambda: cuda.image_to_tensor(images, plan), n + 4 * n)
    small = images[:256]
    ratio("the same, 256 images", lambda: cuda.image_to_tensor(small, plan), (n + 4 * n) // 4)
    ratio(
        "normalize uint8 NHWC -> f16 NHWC (1024x224x224)",
        lambda: cuda.image_to_tensor(images, plan, layout="NHWC", dtype=np.float16),
        n + 2 * n,
    )
    out_n = 256 * 320 * 320 * 3
    ratio(
        "letterbox 480x640 -> 320x320 + normalize, f32 NCHW (256)",
        lambda: cuda.image_to_tensor(big, resize),
        big.size + 4 * out_n,
        "gather-bound (bilinear)",
    )
    nb, rows = logits.nbytes, logits.shape[0]
    ratio("softmax 262144x1000 f32", lambda: cuda.softmax(logits), 2 * nb)
    ratio("sigmoid 262144x1000 f32", lambda: cuda.sigmoid(logits), 2 * nb)
    ratio("threshold 262144x1000 f32 -> bool", lambda: cuda.threshold(logits, 0.5), nb + logits.size)
    ratio("argmax 262144x1000 f32", lambda: cuda.argmax(logits), nb + 8 * rows)
    ratio("top-5 262144x1000 f32", lambda: cuda.topk(logits, 5), nb + 12 * 5 * rows, "compute-bound (5 exact passes)")
    half = logits.astype(cp.float16)
    ratio("softmax 262144x1000 f16", lambda: cuda.softmax(half), 2 * half.nbytes)
    sm = gpu_time(
        lambda: (
            cp.exp(logits - logits.max(1, keepdims=True))
            / cp.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)
        )
    )
    row(
        "softmax as CuPy array operations (for comparison)",
        f"{2 * nb / sm / copy_bw:.2f} of copy",
        f"{sm * 1e3:.3f} ms",
    )

    mean = cp.asarray(np.array(MEAN, np.float32))
    std = cp.asarray(np.array(STD, np.float32))

    def separate() -> Any:
        x = images.astype(cp.float32) / 255.0
        x = (x - mean) / std
        return cp.ascontiguousarray(x.transpose(0, 3, 1, 2))

    fused = gpu_time(lambda: cuda.image_to_tensor(images, plan))
    sep = gpu_time(separate)
    row(
        "fused pre-processing vs the same as CuPy array ops",
        f"{sep / fused:.1f}x faster",
        f"{fused * 1e3:.3f} vs {sep * 1e3:.3f} ms",
    )
    boxes = cp.asarray(
        np.concatenate([rng.uniform(0, 600, (8, 8400, 2)), rng.uniform(600, 640, (8, 8400, 2))], -1).astype(np.float32)
    )
    scores = cp.asarray(rng.uniform(0, 1, (8, 8400)).astype(np.float32))
    t = gpu_time(lambda: cuda.nms(boxes, scores, iou_threshold=0.5, score_threshold=0.25, max_detections=300), repeat=5)
    row("NMS 8 images x 8400 boxes (score > 0.25)", f"{t * 1e3:.2f} ms", "compute-bound: absolute only")


def mlp_model() -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    dims = [1024, 4096, 4096, 4096, 1000]
    nodes, inits, prev = [], [], "x"
    for i, (a, b) in enumerate(itertools.pairwise(dims)):
        inits.append(numpy_helper.from_array((rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32), f"W{i}"))
        out = "y" if i == len(dims) - 2 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [prev, f"W{i}"], [f"m{i}" if out != "y" else "y"]))
        if out != "y":
            nodes.append(helper.make_node("Relu", [f"m{i}"], [out]))
        prev = out
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1024])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1000])],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9).SerializeToString()


def classifier_model() -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    w = (np.random.default_rng(1).standard_normal((3, 1000)) / 3).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["x"], ["p"]),
            helper.make_node("Flatten", ["p"], ["f"]),
            helper.make_node("MatMul", ["f", "W"], ["logits"]),
        ],
        "classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1000])],
        initializer=[numpy_helper.from_array(w, "W")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9).SerializeToString()


def wall(fn: Callable[[], Any], seconds: float = 3.0, max_iters: int = 2000) -> float:
    """Calls per second of ``fn`` over at most ``seconds`` and ``max_iters`` calls, after a warm-up."""
    for _ in range(3):
        fn()
    n, start = 0, time.perf_counter()
    while n < max_iters and time.perf_counter() - start < seconds:
        fn()
        n += 1
    return n / (time.perf_counter() - start)


def callers(fn: Callable[[], Any], n: int = 4, seconds: float = 3.0, max_iters: int = 2000) -> float:
    """Calls per second of ``fn`` from ``n`` threads at once, each making at most ``max_iters`` calls."""
    for _ in range(3):
        fn()
    counts = [0] * n
    stop = time.perf_counter() + seconds

    def loop(i: int) -> None:
        while counts[i] < max_iters and time.perf_counter() < stop:
            fn()
            counts[i] += 1

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(n)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - start)


def predictor_vs_iobinding() -> None:
    import onnxruntime as ort

    import inferkit

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        row("GPU Predictor vs raw I/O binding", "skipped", "onnxruntime-gpu is not installed (../shared/gpu/GPU.md)")
        return
    model, batch = mlp_model(), 512
    x = np.random.default_rng(0).standard_normal((batch, 1024)).astype(np.float32)
    session = ort.InferenceSession(
        model, providers=[("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
    )
    xd = cp.asarray(x)
    yd = cp.empty((batch, 1000), cp.float32)
    binding = session.io_binding()
    binding.bind_input("x", "cuda", 0, np.float32, list(xd.shape), xd.data.ptr)
    binding.bind_output("y", "cuda", 0, np.float32, list(yd.shape), yd.data.ptr)

    def raw_cupy() -> Any:
        session.run_with_iobinding(binding)
        cp.cuda.Device().synchronize()

    raw_device = wall(raw_cupy)
    host = session.io_binding()

    def raw_host() -> Any:
        host.bind_cpu_input("x", x)
        host.bind_output("y", "cpu")
        session.run_with_iobinding(host)
        return host.copy_outputs_to_cpu()

    raw_numpy = wall(raw_host)
    with inferkit.Predictor.from_onnx(model, device="cuda:0", max_batch_size=batch, warmup=False) as predictor:
        ours = wall(lambda: predictor.predict(x))
        backend = predictor.backends()[0]

        def ours_cupy() -> Any:
            predictor.predict(xd)
            cp.cuda.Device().synchronize()  # the predictor returns once the run is queued on its stream

        ours_device = wall(ours_cupy)
    row(
        "raw run_with_iobinding, CuPy in/out (batch 512)",
        f"{raw_device * batch:,.0f} rows/s",
        "device only, no host copy",
    )
    row("raw run_with_iobinding, NumPy in/out (batch 512)", f"{raw_numpy * batch:,.0f} rows/s")
    target = "meets >= 0.9" if ours / raw_numpy >= 0.9 else "BELOW 0.9 target"
    row("GPU Predictor, NumPy in/out, vs raw NumPy I/O binding", f"{ours / raw_numpy:.2f}x", target)
    target = "meets >= 0.9" if ours_device / raw_device >= 0.9 else "BELOW 0.9 target"
    row("GPU Predictor, CuPy in/out, vs raw CuPy I/O binding", f"{ours_device / raw_device:.2f}x", target)
    mine = threading.local()

    def raw_own_binding() -> Any:  # each thread binds its own buffers; ORT synchronises at the end of the run
        if not hasattr(mine, "binding"):
            mine.y = cp.empty((batch, 1000), cp.float32)
            mine.binding = session.io_binding()
            mine.binding.bind_input("x", "cuda", 0, np.float32, list(xd.shape), xd.data.ptr)
            mine.binding.bind_output("y", "cuda", 0, np.float32, list(mine.y.shape), mine.y.data.ptr)
        session.run_with_iobinding(mine.binding)

    raw_4 = callers(raw_own_binding)
    with inferkit.Predictor.from_onnx(model, device="cuda:0", replicas=2, max_batch_size=batch, warmup=False) as two:
        ours_4 = callers(lambda: two.predict(xd))  # returns once its replica's stream is done
    target = "meets >= 0.9" if ours_4 / raw_4 >= 0.9 else "BELOW 0.9 target"
    row("4 callers, CuPy in/out: raw I/O binding (one session)", f"{raw_4 * batch:,.0f} rows/s")
    row("4 callers, CuPy in/out: GPU Predictor (2 replicas) vs raw", f"{ours_4 / raw_4:.2f}x", target)
    row("GPU Predictor NumPy vs raw CuPy I/O binding (host copies)", f"{ours / raw_device:.2f}x", f"{backend.device}")


def end_to_end() -> None:
    import onnxruntime as ort

    import inferkit
    from inferkit.gpu import ImageToTensor, Pipeline, Softmax, TopK

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        row("end-to-end images/s", "skipped", "onnxruntime-gpu is not installed")
        return
    batch = 64
    images = np.random.default_rng(0).integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8)
    pipe = Pipeline(pre=[ImageToTensor(size=(224, 224), mean=MEAN, std=STD)], post=[Softmax(), TopK(5)])
    model = classifier_model()
    with inferkit.Predictor.from_onnx(model, device="cuda:0", pipeline=pipe, max_batch_size=batch, warmup=False) as gpu:
        on_gpu = wall(lambda: gpu.predict(images))
        backend = gpu.backends()[0]
        before = (backend.transfers.h2d, backend.transfers.d2h)
        gpu.predict(images)
        copies = (backend.transfers.h2d - before[0], backend.transfers.d2h - before[1])
    plan = twins.image_plan((224, 224), None, MEAN, STD)
    with inferkit.Predictor.from_onnx(model, device="cuda:0", max_batch_size=batch, warmup=False) as plain:

        def cpu_pre_post() -> Any:
            logits = plain.predict(twins.image_to_tensor(images, plan))
            return twins.topk(twins.softmax(logits), 5)

        on_cpu = wall(cpu_pre_post)
    row("end-to-end, pre/post on the GPU (batch 64, 224x224)", f"{on_gpu * batch:,.0f} images/s")
    row(
        "end-to-end, pre/post on the CPU (NumPy twins)",
        f"{on_cpu * batch:,.0f} images/s",
        f"GPU/CPU {on_gpu / on_cpu:.1f}x",
    )
    ok = copies == (1, 2)
    row(
        "host copies per batch (upload, download)",
        f"{copies[0]}, {copies[1]}",
        "images up; values+indices down" + ("" if ok else " UNEXPECTED"),
    )


def main() -> None:
    props = cp.cuda.runtime.getDeviceProperties(0)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    print(f"device: {name}, CuPy {cp.__version__}, CUDA runtime {cp.cuda.runtime.runtimeGetVersion()}\n")
    bw = copy_bandwidth()
    for section in (lambda: kernels(bw), predictor_vs_iobinding, end_to_end):
        try:
            section()
        except Exception as exc:
            row(getattr(section, "__name__", "section"), "FAILED", f"{type(exc).__name__}: {exc}")
    print("\n| what | figure | note |\n|---|---|---|")
    for what, value, note in ROWS:
        print(f"| {what} | {value} | {note} |")


if __name__ == "__main__":
    main()
