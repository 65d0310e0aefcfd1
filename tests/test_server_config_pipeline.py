"""A model served with its pipeline from the config file: ``[models.pipeline]``, validated at load."""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from test_pipeline import MEAN, STD, classifier, images
from test_server_rest import _binary_body, _decode
from test_server_run import WAIT, _start_cli

from inferkit import Predictor
from inferkit.gpu import ImageToTensor, Pipeline, Softmax, TopK
from inferkit.server.config import ConfigError, load

PIPE = Pipeline(pre=[ImageToTensor(size=(8, 8), mean=MEAN, std=STD, layout="NCHW")], post=[Softmax(), TopK(3)])

CONFIG = """
[[models]]
name = "clf"
path = "clf.onnx"
max_batch_size = 8
device = "cpu"
strict = true

[[models.pipeline.pre]]
step = "ImageToTensor"
size = [8, 8]
mean = [0.485, 0.456, 0.406]
std = [0.229, 0.224, 0.225]
layout = "NCHW"

[[models.pipeline.post]]
step = "Softmax"

[[models.pipeline.post]]
step = "TopK"
k = 3
"""


def _write(tmp_path: Path, body: str) -> Path:
    (tmp_path / "clf.onnx").write_bytes(classifier())
    (tmp_path / "models.toml").write_text(body)
    return tmp_path / "models.toml"


class TestLoad:
    """The ``pipeline`` table of a model becomes an :class:`inferkit.gpu.Pipeline`."""

    def test_the_pipeline_is_built_and_runs(self, tmp_path: Path) -> None:
        """The loaded model takes uint8 images and answers as the same Pipeline built in code."""
        config = load(_write(tmp_path, CONFIG))
        try:
            served = config.repository.model("clf").target
            assert isinstance(served, Predictor)
            x = images(5)
            with Predictor.from_onnx(classifier(), pipeline=PIPE, warmup=False) as same:
                assert served.signature == same.signature
                want = same.predict(x)
            got = served.predict(x)
            np.testing.assert_array_equal(got["indices"], want["indices"])
            np.testing.assert_array_equal(got["values"], want["values"])
        finally:
            config.repository.close()

    @pytest.mark.parametrize(
        ("pipeline", "message"),
        [
            ('pipeline = "resnet"', r"models\[0\]\.pipeline must be a table"),
            ("pipeline = { pre = [], middle = [] }", r"models\[0\]\.pipeline: unknown field\(s\) \['middle'\]"),
            ('pipeline = { pre = { step = "ImageToTensor" } }', r"models\[0\]\.pipeline\.pre must be an array"),
            ('pipeline = { post = [{ step = "Resize" }] }', r"models\[0\]\.pipeline\.post\[0\]\.step must be one of"),
            ('pipeline = { pre = [{ step = "Softmax" }] }', r"models\[0\]\.pipeline\.pre\[0\]\.step must be one of"),
            ('pipeline = { post = [{ fn = "os.system" }] }', r"models\[0\]\.pipeline\.post\[0\]\.step must be one of"),
            ('pipeline = { post = ["Softmax"] }', r"models\[0\]\.pipeline\.post\[0\] must be a table"),
            (
                'pipeline = { post = [{ step = "Softmax" }, { step = "TopK", k = 3, kk = 1 }] }',
                r"models\[0\]\.pipeline\.post\[1\]: unknown field\(s\) \['kk'\]",
            ),
            (
                'pipeline = { post = [{ step = "TopK", k = 0 }] }',
                r"models\[0\]\.pipeline\.post\[0\] \(TopK\): k must be an int >= 1, got 0",
            ),
            (
                'pipeline = { pre = [{ step = "ImageToTensor", size = [8] }] }',
                r"models\[0\]\.pipeline\.pre\[0\] \(ImageToTensor\): size must be \(height, width\)",
            ),
            (
                'pipeline = { pre = [{ step = "ImageToTensor", size = [8, 8], dtype = "float16" }] }',
                r"models\[0\]\.pipeline\.pre\[0\]: ImageToTensor makes float16 .* but model input 'x' takes float32",
            ),
            (
                'pipeline = { post = [{ step = "Softmax" }, { step = "TopK", k = 30 }] }',
                r"models\[0\]\.pipeline\.post\[1\]: TopK\(k=30\) needs at least 30 values per row",
            ),
            ('device = 7\npipeline = { post = [{ step = "Softmax" }] }', r"models\[0\]\.device must be a device"),
            ('strict = "yes"', r"models\[0\]\.strict must be true or false"),
        ],
    )
    def test_a_bad_pipeline_is_a_config_error_naming_the_key(self, tmp_path: Path, pipeline: str, message: str) -> None:
        """Each mistake is a ConfigError at load that names the key it is about."""
        body = f'[[models]]\nname = "clf"\npath = "clf.onnx"\n{pipeline}\n'
        with pytest.raises(ConfigError, match=message):
            load(_write(tmp_path, body))

    def test_a_mismatch_in_a_version_names_the_version(self, tmp_path: Path) -> None:
        """A version's pipeline errors carry the version's path."""
        body = (
            '[[models]]\nname = "clf"\n'
            'versions.1 = { path = "clf.onnx", pipeline = { post = [{ step = "TopK", k = 11 }] } }\n'
        )
        with pytest.raises(ConfigError, match=r"models\[0\]\.versions\.1\.pipeline\.post\[0\]: TopK\(k=11\)"):
            load(_write(tmp_path, body))


class TestServe:
    """``inferkit serve --config`` with a pipeline, real REST and gRPC clients."""

    def test_rest_and_grpc_clients_get_the_in_process_answers(self, tmp_path: Path) -> None:
        """uint8 images of two sizes over REST (binary) and gRPC (tritonclient) give what the same
        Pipeline gives in process; the metadata shows what callers send."""
        proc, port, grpc_port = _start_cli("--config", str(_write(tmp_path, CONFIG)))
        try:
            batches = [images(3, seed=1), images(2, h=20, w=7, seed=2), images(1, h=8, w=8, seed=3)]
            with Predictor.from_onnx(classifier(), pipeline=PIPE, warmup=False) as same:
                wants = [same.predict(x) for x in batches]
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=WAIT) as http:
                meta = http.get("/v2/models/clf").json()
                assert meta["inputs"] == [{"name": "x", "datatype": "UINT8", "shape": [-1, -1, -1, 3]}]
                for x, want in zip(batches, wants, strict=True):
                    body, headers = _binary_body({"x": x})
                    _, got = _decode(http.post("/v2/models/clf/infer", content=body, headers=headers))
                    np.testing.assert_array_equal(got["indices"], want["indices"])
                    np.testing.assert_array_equal(got["values"], want["values"])
            with grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}") as client:
                for x, want in zip(batches, wants, strict=True):
                    tensor = grpcclient.InferInput("x", list(x.shape), "UINT8")
                    tensor.set_data_from_numpy(x)
                    result = client.infer("clf", [tensor])
                    np.testing.assert_array_equal(result.as_numpy("indices"), want["indices"])
                    np.testing.assert_array_equal(result.as_numpy("values"), want["values"])
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(WAIT) == 0
            assert proc.stderr is not None
            proc.stderr.close()
