"""Ray Data and Ray Serve with inferkit inside: the same predictions as the local Predictor (``make test-ray``)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.filterwarnings("ignore::DeprecationWarning")]  # Ray's own
ray = pytest.importorskip("ray", reason="Ray is not in the dev extra (about 80 MB): run `make test-ray`")

import inferkit  # noqa: E402
from inferkit.integrations import ray as ik_ray  # noqa: E402


@pytest.fixture(name="cluster", scope="module")
def _cluster() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(name="model_file")
def _model_file(mlp_model: bytes, tmp_path: Path) -> Path:
    path = tmp_path / "mlp.onnx"
    path.write_bytes(mlp_model)
    return path


def test_ray_data_matches_local(cluster: None, model_file: Path) -> None:
    """map_batches with BatchPredictor gives the local Predictor's outputs, row for row."""
    x = np.random.default_rng(0).standard_normal((5000, 4)).astype(np.float32)
    # Four blocks, so both actors get work: Ray warns (an error here) when a pool outnumbers its blocks.
    ds = ray.data.from_numpy(np.array_split(x, 4)).map_batches(
        ik_ray.BatchPredictor,
        fn_constructor_kwargs={"model": str(model_file)},
        compute=ray.data.ActorPoolStrategy(size=2),
        batch_size=1024,
    )
    rows = ds.take_all()
    with inferkit.Predictor.from_onnx(model_file) as local:
        want = local.map(x)
    got = {tuple(r["data"]): r["y"] for r in rows}
    assert len(rows) == len(x)
    for xi, yi in zip(x, want, strict=True):
        np.testing.assert_array_equal(got[tuple(xi)], yi)


@pytest.mark.parametrize("cpus", [1, 2])
def test_batch_predictor_threads_follow_the_actors_cpus(cluster: None, model_file: Path, cpus: int) -> None:
    """Actors share the machine: each session takes the CPUs Ray gave its actor, and no more."""

    @ray.remote(num_cpus=cpus)
    def threads(path: str, **options: object) -> list[int]:
        batch = ik_ray.BatchPredictor(path, **options)
        try:
            return [b.cpu_threads for b in batch.predictor.backends()]  # type: ignore[attr-defined]
        finally:
            batch.predictor.close()

    assert ray.get(threads.remote(str(model_file))) == [cpus]
    assert ray.get(threads.remote(str(model_file), intra_op_threads=3)) == [3]  # given: as given


def test_ray_data_parquet_feature_columns(cluster: None, model_file: Path, tmp_path: Path) -> None:
    """read_parquet + BatchPredictor: a one-input model takes the file's columns as features, in order."""
    import pyarrow as pa  # in the ray extra, through bulk
    import pyarrow.parquet as pq

    x = np.random.default_rng(2).standard_normal((600, 4)).astype(np.float32)
    pq.write_table(pa.table({c: x[:, i] for i, c in enumerate("abcd")}), tmp_path / "x.parquet")
    ds = ray.data.read_parquet(str(tmp_path / "x.parquet")).map_batches(
        ik_ray.BatchPredictor,
        fn_constructor_kwargs={"model": str(model_file)},
        compute=ray.data.ActorPoolStrategy(size=1),  # one file may be one block: see above
        batch_size=256,
    )
    rows = ds.take_all()
    with inferkit.Predictor.from_onnx(model_file) as local:
        want = local.map(x)
    got = {(r["a"], r["b"], r["c"], r["d"]): r["y"] for r in rows}
    assert len(rows) == len(x)
    for xi, yi in zip(x, want, strict=True):
        np.testing.assert_array_equal(got[tuple(xi)], yi)


def test_ray_serve_speaks_open_inference_protocol(cluster: None, model_file: Path) -> None:
    """tritonclient.http against the Ray Serve deployment gets the local Predictor's outputs."""
    from ray import serve
    from tritonclient import http as triton

    app = ik_ray.deployment(
        lambda: inferkit.Predictor.from_onnx(model_file, name="mlp"),
        autoscaling_config={"min_replicas": 1, "max_replicas": 2},
    )
    port = _free_port()  # Serve's proxy takes `port` as it is: 0 is not "any free port"
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(app, route_prefix="/")
        x = np.random.default_rng(1).standard_normal((7, 4)).astype(np.float32)
        client = triton.InferenceServerClient(f"127.0.0.1:{port}")
        try:
            assert client.is_model_ready("mlp")
            tensor = triton.InferInput("x", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x, binary_data=True)
            result = client.infer("mlp", [tensor])
        finally:
            client.close()
        with inferkit.Predictor.from_onnx(model_file) as local:
            np.testing.assert_array_equal(result.as_numpy("y"), local.predict(x))
    finally:
        serve.shutdown()


def test_ray_serve_closes_its_models_when_a_replica_stops(cluster: None, model_file: Path, tmp_path: Path) -> None:
    """serve.delete stops the replica gracefully: its Predictor is closed (its threads end), not left to the kill."""
    import time

    from ray import serve

    marker = tmp_path / "closed"

    def build() -> inferkit.Predictor:
        def on_event(event: inferkit.Event) -> None:
            if isinstance(event, inferkit.StateChanged) and event.state == "closed":
                marker.write_text("closed")

        return inferkit.Predictor.from_onnx(model_file, name="mlp", observers=[on_event])

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(ik_ray.deployment(build), name="closing", route_prefix="/")
        assert not marker.exists()
        serve.delete("closing")
        deadline = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists()
    finally:
        serve.shutdown()


def test_batch_predictor_in_the_driver_refuses_a_batch_of_no_columns(cluster: None, model_file: Path) -> None:
    """Built in the driver of a running cluster (Ray asserted there), it refuses a batch with no columns with a
    typed InvalidInput naming the problem (np.column_stack raised a bare ValueError)."""
    predict = ik_ray.BatchPredictor(str(model_file))
    try:
        with pytest.raises(inferkit.InvalidInput, match="no columns"):
            predict({})
    finally:
        predict.predictor.close()
