"""Backends: the model instances that replicas own (ONNX Runtime, Python callables)."""
