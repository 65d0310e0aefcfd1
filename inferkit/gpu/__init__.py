"""Pre- and post-processing on the replica's device: CUDA kernels on a GPU, their NumPy twins on a CPU.

``import inferkit`` does not import this package; ``inferkit.gpu`` imports it on first use, and
it imports CuPy only when a GPU replica runs a step (:mod:`inferkit.gpu.cuda`). One pipeline
definition gives the same results on both devices (see :mod:`inferkit.gpu.twins` for how exactly)::

    pipe = inferkit.gpu.Pipeline(
        pre=[inferkit.gpu.ImageToTensor(size=(224, 224), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))],
        post=[inferkit.gpu.Softmax(), inferkit.gpu.TopK(5)],
    )
    predictor = inferkit.Predictor.from_onnx("resnet.onnx", device="cuda", pipeline=pipe, replicas=4)
"""

from inferkit.gpu.pipeline import Custom, Pipeline, PipelineMismatch
from inferkit.gpu.post import NMS, ArgMax, Sigmoid, Softmax, Threshold, TopK
from inferkit.gpu.pre import ImageToTensor
from inferkit.gpu.step import Kit, PostStep, PreStep

__all__ = [
    "NMS",
    "ArgMax",
    "Custom",
    "ImageToTensor",
    "Kit",
    "Pipeline",
    "PipelineMismatch",
    "PostStep",
    "PreStep",
    "Sigmoid",
    "Softmax",
    "Threshold",
    "TopK",
]
