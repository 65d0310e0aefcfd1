"""Triton parity, driven by tritonclient itself over HTTP and gRPC against one live server.

Statistics and model configuration on both protocols, Triton's error wording, the extensions
the server lists, and models loaded, swapped and unloaded while 32 threads send traffic.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import onnx
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from onnx import TensorProto, helper
from tritonclient.utils import InferenceServerException

from inferkit import PoolConfig, Predictor, Router, TensorSpec
from inferkit.cli import main
from inferkit.errors import Closed
from inferkit.server import Repository, ServedModel
from inferkit.server.config import load
from inferkit.server.control import LoadFailed, RepositoryControl
from inferkit.server.run import InferenceServer

WAIT = 30  # seconds: a bound on every wait, never expected to be reached
TOKEN = "an-operator-token-of-some-length"
AUTH = {"authorization": f"Bearer {TOKEN}"}


def scaled(factor: float, name: str = "m", **kw: Any) -> Predictor:
    """``y = factor * x`` over float32 rows of 4."""
    return Predictor.from_callable(
        lambda x: x * np.float32(factor),
        inputs=[TensorSpec("x", np.float32, (None, 4))],
        outputs=[TensorSpec("y", np.float32, (None, 4))],
        name=name,
        **kw,
    )


class HttpClient(thttp.InferenceServerClient):  # type: ignore[misc]
    """tritonclient.http's client, closed explicitly (its ``__del__`` raises from other threads)."""

    def __del__(self) -> None:
        pass


class Clients:
    """A running InferenceServer and a tritonclient of each kind."""

    def __init__(self, server: InferenceServer) -> None:
        self.server = server
        self.http = HttpClient(f"127.0.0.1:{server.port}", network_timeout=WAIT)
        self.grpc = tgrpc.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")

    def infer(self, protocol: str, model: str, x: np.ndarray, version: str = "") -> np.ndarray:
        """``y`` for ``x`` through the tritonclient of ``protocol``."""
        module: Any = thttp if protocol == "http" else tgrpc
        client: Any = self.http if protocol == "http" else self.grpc
        tensor = module.InferInput("x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer(model, [tensor], model_version=version)
        return np.asarray(result.as_numpy("y"))


@pytest.fixture(name="start")
def _start() -> Iterator[Callable[..., Clients]]:
    """Start servers (REST and gRPC on free ports) for a test; stop them after it."""
    started: list[Clients] = []

    def start(repository: Repository, **options: Any) -> Clients:
        server = InferenceServer(repository, port=0, grpc_port=0, grace=WAIT, grpc_listeners=1, **options).start()
        clients = Clients(server)
        started.append(clients)
        return clients

    yield start
    for clients in started:
        clients.http.close()
        clients.grpc.close()
        clients.server.join(WAIT)


def _grpc_error(call: Callable[[], Any]) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value


class TestStatistics:
    """ModelStatistics answers over gRPC what /stats answers over REST, with the right counts."""

    def test_counts_after_traffic_on_both_protocols(self, start: Callable[..., Clients]) -> None:
        """Three requests of 2 rows on each protocol: 6 successes, 12 rows, per-size batch counts."""
        c = start(Repository({"m": scaled(2, max_batch_size=2)}))
        x = np.ones((2, 4), np.float32)
        for protocol in ("http", "grpc") * 3:
            np.testing.assert_array_equal(c.infer(protocol, "m", x), x * 2)
        over_http = c.http.get_inference_statistics("m")["model_stats"][0]
        over_grpc = c.grpc.get_inference_statistics("m", as_json=True)["model_stats"][0]
        for stats in (over_http, over_grpc):
            assert stats["name"] == "m"
            assert int(stats["inference_count"]) == 12
            assert int(stats["execution_count"]) == 6
            assert int(stats["inference_stats"]["success"]["count"]) == 6
            assert int(stats["inference_stats"]["success"]["ns"]) > 0
            assert int(stats["inference_stats"]["compute_infer"]["count"]) == 6
            assert [(int(b["batch_size"]), int(b["compute_infer"]["count"])) for b in stats["batch_stats"]] == [(2, 6)]
        typed = c.grpc.get_inference_statistics("m")  # the protobuf message, parsed by tritonclient
        assert typed.model_stats[0].inference_count == 12

    def test_requests_refused_at_the_door_count_as_failures(self, start: Callable[..., Clients]) -> None:
        """Refusals at the door (1,919 Overloaded 503s in the probe, or a wrong shape) left ``fail.count``
        at 0; Triton counts them as failures."""
        c = start(Repository({"m": scaled(2)}))
        with pytest.raises(InferenceServerException):
            c.infer("http", "m", np.ones((2, 3), np.float32))  # the wrong shape: refused at the door
        stats = c.http.get_inference_statistics("m")["model_stats"][0]["inference_stats"]
        assert (int(stats["success"]["count"]), int(stats["fail"]["count"])) == (0, 1)

    def test_every_model_and_versions(self, start: Callable[..., Clients]) -> None:
        """Without a name, every model; a model with versions has an entry per version."""
        v1, v2 = scaled(1, "clf-1"), scaled(2, "clf-2")
        router = Router({"1": v1, "2": v2}, name="clf")
        c = start(Repository([ServedModel("m", scaled(2)), ServedModel("clf", router, {"1": v1, "2": v2})]))
        entries = c.grpc.get_inference_statistics(as_json=True)["model_stats"]
        assert [(e["name"], e.get("version", "")) for e in entries] == [
            ("clf", ""),
            ("clf", "1"),
            ("clf", "2"),
            ("m", ""),
        ]
        c.infer("grpc", "clf", np.ones((1, 4), np.float32), version="2")
        pinned = c.grpc.get_inference_statistics("clf", "2", as_json=True)["model_stats"]
        assert [(e["version"], int(e["inference_count"])) for e in pinned] == [("2", 1)]

    def test_unknown_model_in_tritons_words(self, start: Callable[..., Clients]) -> None:
        """Statistics of an unknown model: NOT_FOUND (404) starting with Triton's message."""
        c = start(Repository({"m": scaled(2)}))
        for call in (lambda: c.grpc.get_inference_statistics("nope"), lambda: c.http.get_inference_statistics("nope")):
            assert "Request for unknown model: 'nope' is not found" in _grpc_error(call).message()


class TestModelConfig:
    """GET /v2/models/{m}/config and ModelConfig: a Triton-shaped config that matches the model."""

    def test_config_matches_the_model(self, start: Callable[..., Clients]) -> None:
        """Name, max_batch_size, tensors without the batch axis, batching settings, instance group."""
        model = scaled(2, max_batch_size=8, max_delay_ms=1.5, max_queue_size=100, pool=PoolConfig(replicas=2))
        c = start(Repository({"m": model}))
        expected = {
            "name": "m",
            "max_batch_size": 8,
            "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [4]}],
            "output": [{"name": "y", "data_type": "TYPE_FP32", "dims": [4]}],
            "dynamic_batching": {"max_queue_delay_microseconds": 1500, "default_queue_policy": {"max_queue_size": 100}},
            "instance_group": [{"name": "m_0", "kind": "KIND_CPU", "count": 2}],
        }
        over_http = c.http.get_model_config("m")
        over_grpc = c.grpc.get_model_config("m", as_json=True)["config"]
        typed = c.grpc.get_model_config("m").config
        for config in (over_http, over_grpc):
            for key in ("name", "input", "output", "instance_group"):
                assert _plain(config[key]) == _plain(expected[key]), key
            assert int(config["max_batch_size"]) == 8
            batching = config["dynamic_batching"]
            assert int(batching["max_queue_delay_microseconds"]) == 1500
            assert int(batching["default_queue_policy"]["max_queue_size"]) == 100
        assert typed.max_batch_size == 8
        assert list(typed.input[0].dims) == [4]
        assert typed.WhichOneof("scheduling_choice") == "dynamic_batching"

    def test_dynamic_dims_bytes_and_unknown_model(self, start: Callable[..., Clients]) -> None:
        """A dynamic dimension is -1, BYTES is TYPE_STRING; an unknown model is Triton's NOT_FOUND."""
        text = Predictor.from_callable(
            lambda x: x,
            inputs=[TensorSpec("s", object, (None, None))],
            outputs=[TensorSpec("t", object, (None, None))],
        )
        c = start(Repository({"text": text}))
        config = c.grpc.get_model_config("text", as_json=True)["config"]
        assert config["input"] == [{"name": "s", "data_type": "TYPE_STRING", "dims": ["-1"]}]
        error = _grpc_error(lambda: c.grpc.get_model_config("nope"))
        assert error.status() == str(grpc.StatusCode.NOT_FOUND)
        assert error.message().startswith("Request for unknown model: 'nope' is not found")


def _plain(value: Any) -> Any:
    """JSON with integers as ints and without the fields proto3 JSON leaves out when empty."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if v not in ([], "", 0, {})}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, str) and value.lstrip("-").isdigit():
        return int(value)
    return value


class TestWording:
    """The messages Triton's clients match on start with Triton's words, on both protocols."""

    def test_unknown_model_and_versions(self, start: Callable[..., Clients]) -> None:
        """Unknown model, unknown integral version, unparseable version string: Triton's prefixes."""
        v1 = scaled(1, "clf-1")
        c = start(Repository([ServedModel("m", scaled(2)), ServedModel("clf", Router({"1": v1}), {"1": v1})]))
        x = np.ones((1, 4), np.float32)
        cases = [
            ("nope", "", "Request for unknown model: 'nope' is not found"),
            ("clf", "7", "Request for unknown model: 'clf' version 7 is not found"),
            ("clf", "v7", "failed to get model version from specified version string 'v7'"),
        ]
        for protocol in ("http", "grpc"):
            for model, version, prefix in cases:
                error = _grpc_error(lambda p=protocol, m=model, v=version: c.infer(p, m, x, v))
                assert error.message().startswith(prefix), (protocol, error.message())

    def test_contents_beside_raw_input_contents(self, start: Callable[..., Clients]) -> None:
        """gRPC typed contents beside raw_input_contents: Triton's sentence, naming input and model."""
        c = start(Repository({"simple": scaled(2)}))
        request = tgrpc.service_pb2.ModelInferRequest(model_name="simple")
        tensor = request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 4])
        tensor.contents.fp32_contents.extend([1.0] * 4)
        request.raw_input_contents.append(np.ones(4, np.float32).tobytes())
        with pytest.raises(grpc.RpcError) as info:
            c.grpc._client_stub.ModelInfer(request, timeout=WAIT)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith(
            "contents field must not be specified when using raw_input_contents for 'INPUT0' for model 'simple'"
        )

    def test_unknown_output(self, start: Callable[..., Clients]) -> None:
        """An output the model lacks: Triton's ``unexpected inference output``, on both protocols."""
        c = start(Repository({"m": scaled(2)}))
        x = np.ones((1, 4), np.float32)
        for module, client in ((thttp, c.http), (tgrpc, c.grpc)):
            tensor = module.InferInput("x", [1, 4], "FP32")
            tensor.set_data_from_numpy(x)
            outputs = [module.InferRequestedOutput("z")]
            error = _grpc_error(lambda cl=client, t=tensor, o=outputs: cl.infer("m", [t], outputs=o))
            assert error.message().startswith("unexpected inference output 'z' for model 'm'"), error.message()


class TestServerMetadata:
    """Server metadata lists exactly the extensions served, on each protocol."""

    def test_extensions_without_and_with_repository_control(self, start: Callable[..., Clients]) -> None:
        """binary_tensor_data is HTTP's alone; model_repository only where load and unload are on."""
        off = start(Repository({"m": scaled(2)}))
        on = start(Repository({"m": scaled(2)}), control=RepositoryControl(enabled=True, token=TOKEN))
        common = ["model_configuration", "parameters", "statistics"]
        assert off.http.get_server_metadata()["extensions"] == sorted(["binary_tensor_data", *common])
        assert off.grpc.get_server_metadata(as_json=True)["extensions"] == common
        assert on.http.get_server_metadata()["extensions"] == sorted(
            ["binary_tensor_data", "model_repository", *common]
        )
        assert on.grpc.get_server_metadata(as_json=True)["extensions"] == sorted(["model_repository", *common])


class Factory:
    """A loader: ``scaled(factor)`` where the load's config says ``parameters.factor``; records what it built."""

    def __init__(self) -> None:
        self.built: list[Predictor] = []
        self.lock = threading.Lock()

    def __call__(self, name: str, config: Mapping[str, Any]) -> ServedModel:
        factor = float(config.get("parameters", {}).get("factor", {}).get("string_value", "1"))
        predictor = scaled(factor, f"{name}-{factor}", max_batch_size=8)
        with self.lock:
            self.built.append(predictor)
        return ServedModel(name, predictor)


def _factor(value: float) -> str:
    return json.dumps({"parameters": {"factor": {"string_value": str(value)}}})


UNLOADED = "Request for unknown model: 'm' has no available versions"


class TestRepositoryControl:
    """Load, hot swap and unload through tritonclient, guarded by the operator's token."""

    def test_off_by_default_and_token_checked(self, start: Callable[..., Clients]) -> None:
        """Off: 403 on both protocols. On: no token 401/UNAUTHENTICATED, a wrong one 403/PERMISSION_DENIED."""
        off = start(Repository({"m": scaled(1)}))
        on = start(Repository({"m": scaled(1)}), control=RepositoryControl(enabled=True, token=TOKEN, loader=Factory()))
        cases = [
            (off, AUTH, "403", grpc.StatusCode.PERMISSION_DENIED, "explicit model load / unload is not allowed"),
            (on, None, "401", grpc.StatusCode.UNAUTHENTICATED, "needs the operator's token"),
            (on, {"authorization": "Bearer wrong"}, "403", grpc.StatusCode.PERMISSION_DENIED, "not valid"),
            (on, {"authorization": TOKEN}, "403", grpc.StatusCode.PERMISSION_DENIED, "not valid"),
        ]
        for clients, headers, http_status, code, words in cases:
            for call in (
                lambda c=clients, h=headers: c.http.load_model("m", headers=h),
                lambda c=clients, h=headers: c.http.unload_model("m", headers=h),
            ):
                error = _grpc_error(call)
                assert (error.status(), words in error.message()) == (http_status, True), error.message()
            for call in (
                lambda c=clients, h=headers: c.grpc.load_model("m", headers=h),
                lambda c=clients, h=headers: c.grpc.unload_model("m", headers=h),
            ):
                error = _grpc_error(call)
                assert (error.status(), words in error.message()) == (str(code), True), error.message()
            assert clients.grpc.is_model_ready("m")  # nothing changed
        assert [m["name"] for m in off.http.get_model_repository_index()] == ["m"]  # the index needs no token

    def test_load_unload_and_index(self, start: Callable[..., Clients]) -> None:
        """Unload: Triton's unloaded answer and UNAVAILABLE in the index; load brings it back, swapped."""
        factory = Factory()
        c = start(Repository({"m": scaled(1)}), control=RepositoryControl(enabled=True, token=TOKEN, loader=factory))
        x = np.ones((1, 4), np.float32)
        c.grpc.unload_model("m", headers=AUTH)
        for protocol in ("http", "grpc"):
            assert _grpc_error(lambda p=protocol: c.infer(p, "m", x)).message().startswith(UNLOADED)
        index = c.grpc.get_model_repository_index(as_json=True)["models"]
        assert [(m["name"], m["state"]) for m in index] == [("m", "UNAVAILABLE")]
        assert c.http.get_model_repository_index() == [
            {"name": "m", "version": "", "state": "UNAVAILABLE", "reason": "unloaded"}
        ]
        c.http.load_model("m", headers=AUTH, config=_factor(3))
        np.testing.assert_array_equal(c.infer("grpc", "m", x), x * 3)
        c.grpc.load_model("m", headers=AUTH, config=_factor(5))  # a hot swap of a served model
        np.testing.assert_array_equal(c.infer("http", "m", x), x * 5)
        assert [(m["name"], m["state"]) for m in c.http.get_model_repository_index()] == [("m", "READY")]
        assert factory.built[0].state.value == "closed"  # the swapped-out model drained and closed

    def test_bad_load_parameters_change_nothing(self, start: Callable[..., Clients]) -> None:
        """Files, unknown parameters and bad JSON are refused (400/INVALID_ARGUMENT); the model still serves."""
        c = start(Repository({"m": scaled(1)}), control=RepositoryControl(enabled=True, token=TOKEN, loader=Factory()))
        error = _grpc_error(lambda: c.grpc.load_model("m", headers=AUTH, config="{", files={"file:1/model.onnx": b"x"}))
        assert error.status() == str(grpc.StatusCode.INVALID_ARGUMENT)
        error = _grpc_error(lambda: c.http.load_model("m", headers=AUTH, config="[1]"))
        assert error.status() == "400"
        np.testing.assert_array_equal(c.infer("http", "m", np.ones((1, 4), np.float32)), np.ones((1, 4)))

    def test_a_name_no_url_can_reach_is_refused(self, start: Callable[..., Clients]) -> None:
        """gRPC could load "a/b" and REST "%2e%2e" (".."): both served, neither reachable over REST."""
        factory = Factory()
        c = start(Repository({"m": scaled(1)}), control=RepositoryControl(enabled=True, token=TOKEN, loader=factory))
        for name in ("a/b", "..", "."):
            error = _grpc_error(lambda n=name: c.grpc.load_model(n, headers=AUTH))
            assert (error.status(), "must be a non-empty printable string without '/'" in error.message()) == (
                str(grpc.StatusCode.INVALID_ARGUMENT),
                True,
            ), error.message()
        reply = httpx.post(f"http://127.0.0.1:{c.server.port}/v2/repository/models/%2e%2e/load", headers=AUTH)
        assert (reply.status_code, "got '..'" in reply.text) == (400, True), reply.text
        assert factory.built == []
        assert [m["name"] for m in c.http.get_model_repository_index()] == ["m"]

    def test_a_config_nested_thousands_deep_is_a_400(self, start: Callable[..., Clients]) -> None:
        """JSON nesting past Python's recursion limit is the client's mistake (it answered 500)."""
        c = start(Repository({"m": scaled(1)}), control=RepositoryControl(enabled=True, token=TOKEN, loader=Factory()))
        error = _grpc_error(lambda: c.http.load_model("m", headers=AUTH, config="[" * 100_000))
        assert error.status() == "400"
        np.testing.assert_array_equal(c.infer("http", "m", np.ones((1, 4), np.float32)), np.ones((1, 4)))

    def test_loads_waiting_their_turn_hold_no_thread_of_the_shared_pool(self) -> None:
        """Changes run one at a time; the ones waiting must not each hold a thread of asyncio's default pool,
        which decodes other clients' large requests (with 7 loads queued, one 1 MB request took 12 s)."""
        import asyncio

        from inferkit.server.control import Controller

        gate = threading.Event()

        def slow(name: str, config: Mapping[str, Any]) -> ServedModel:
            assert gate.wait(WAIT)
            return ServedModel(name, scaled(1))

        repository = Repository({"m": scaled(1)})
        controller = Controller(repository, RepositoryControl(enabled=True, token=TOKEN, loader=slow))

        async def main() -> None:
            loads = [asyncio.ensure_future(controller.load("m", {})) for _ in range(40)]
            await asyncio.sleep(0.05)
            try:
                assert await asyncio.wait_for(asyncio.to_thread(lambda: 7), 5) == 7  # the pool has a free thread
            finally:
                gate.set()
            await asyncio.wait_for(asyncio.gather(*loads), WAIT)

        try:
            asyncio.run(main())
        finally:
            gate.set()
            repository.close(WAIT)

    def test_a_stop_refuses_queued_changes_at_once_and_closes_a_model_built_after_it(self) -> None:
        """SIGTERM while loads run: those still waiting get 503 at once (they waited the whole grace, then
        a traceback each); the running one has the grace; the model it builds later is closed, never served,
        and the build does not hold the server up (it held the process ~7 s per queued load)."""
        import httpx

        started, gate = threading.Event(), threading.Event()
        built: list[Predictor] = []

        def slow(name: str, config: Mapping[str, Any]) -> ServedModel:
            started.set()
            assert gate.wait(WAIT)
            built.append(scaled(2))
            return ServedModel(name, built[-1])

        first = scaled(1)
        control = RepositoryControl(enabled=True, token=TOKEN, loader=slow)
        server = InferenceServer(Repository({"m": first}), port=0, grpc_port=0, grace=0.5, control=control).start()
        answers: dict[int, str] = {}

        def load(i: int) -> None:
            url = f"http://127.0.0.1:{server.port}/v2/repository/models/m/load"
            try:
                reply = httpx.post(url, headers=AUTH, timeout=WAIT)
                answers[i] = f"{reply.status_code} {reply.json()['error']}"
            except httpx.HTTPError as error:
                answers[i] = type(error).__name__

        clients = [threading.Thread(target=load, args=(0,))]
        clients[0].start()
        try:
            assert started.wait(WAIT)
            clients += [threading.Thread(target=load, args=(i,)) for i in (1, 2)]
            for client in clients[1:]:
                client.start()
            time.sleep(0.2)  # queued behind the first (or, if slower, refused after the stop: the same answer)
            server.stop()
            for client in clients[1:]:
                client.join(WAIT)
            assert not gate.is_set()  # answered while the first build still runs
            server.join(WAIT)
            assert not server._lifecycle.thread.is_alive()  # type: ignore[union-attr]  # the build held nothing up
        finally:
            gate.set()
            clients[0].join(WAIT)
        assert answers == {
            0: "RemoteProtocolError",  # cut off at the end of the grace period
            1: "503 the server is shutting down: no model is loaded or unloaded any more",
            2: "503 the server is shutting down: no model is loaded or unloaded any more",
        }
        deadline = time.monotonic() + WAIT
        while not (built and built[0].state.value == "closed") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [p.state.value for p in (first, *built)] == ["closed", "closed"]

    def test_loads_and_unloads_take_turns_across_both_protocols(self, start: Callable[..., Clients]) -> None:
        """A gRPC unload sent while a REST load builds runs after it (each face had its own turn: the
        unload ran first and the load then brought the model back)."""
        started, gate = threading.Event(), threading.Event()

        def slow(name: str, config: Mapping[str, Any]) -> ServedModel:
            started.set()
            assert gate.wait(WAIT)
            return ServedModel(name, scaled(2))

        c = start(Repository({"m": scaled(1)}), control=RepositoryControl(enabled=True, token=TOKEN, loader=slow))
        url = f"http://127.0.0.1:{c.server.port}/v2/repository/models/m/load"
        # httpx: tritonclient.http works on the main thread only
        loading = threading.Thread(target=lambda: httpx.post(url, headers=AUTH, timeout=WAIT))
        loading.start()
        unloading = threading.Thread(target=lambda: c.grpc.unload_model("m", headers=AUTH))
        try:
            assert started.wait(WAIT)
            unloading.start()
            unloading.join(0.3)
            assert unloading.is_alive()  # waits for the load's turn to end
            assert c.grpc.is_model_ready("m")
        finally:
            gate.set()
            loading.join(WAIT)
            unloading.join(WAIT)
        assert [(m["name"], m["state"]) for m in c.http.get_model_repository_index()] == [("m", "UNAVAILABLE")]

    def test_a_change_cancelled_while_waiting_leaves_the_turns_to_the_rest(self) -> None:
        """A gRPC client gives up on a queued load (its call is cancelled): the loads after it still run in order."""
        import asyncio

        from inferkit.server.control import Controller

        order: list[str] = []

        def loader(name: str, config: Mapping[str, Any]) -> ServedModel:
            order.append(config["tag"])
            time.sleep(0.05)
            return ServedModel(name, scaled(1))

        repository = Repository({"m": scaled(1)})
        controller = Controller(repository, RepositoryControl(enabled=True, token=TOKEN, loader=loader))

        async def main() -> None:
            loads = [asyncio.ensure_future(controller.load("m", {"tag": tag})) for tag in "abcd"]
            await asyncio.sleep(0.01)
            loads[1].cancel()
            done = await asyncio.wait_for(asyncio.gather(*loads, return_exceptions=True), WAIT)
            assert [type(d).__name__ for d in done] == ["NoneType", "CancelledError", "NoneType", "NoneType"]
            controller.stop()
            with pytest.raises(Closed, match="shutting down"):
                await controller.unload("m")

        try:
            asyncio.run(main())
        finally:
            repository.close(WAIT)
        assert order == ["a", "c", "d"]

    def test_swap_and_unload_under_traffic(self, start: Callable[..., Clients]) -> None:
        """32 threads on both protocols while the model is swapped, unloaded and loaded: nothing lost.

        Every request is answered by one of the loaded models, correctly, or (only while the
        model is unloaded) with Triton's unloaded-model error; every model swapped out
        answered all it accepted.
        """
        factory = Factory()
        first = scaled(1, "m-1", max_batch_size=8)
        control = RepositoryControl(enabled=True, token=TOKEN, loader=factory)
        c = start(Repository({"m": first}), control=control)
        stop = threading.Event()
        errors: list[str] = []
        answers: dict[float, int] = {}
        lock = threading.Lock()

        def client(i: int) -> None:
            protocol = "http" if i % 2 else "grpc"
            url = f"127.0.0.1:{c.server.port if protocol == 'http' else c.server.grpc_port}"
            module: Any = thttp if protocol == "http" else tgrpc
            own: Any = HttpClient(url, network_timeout=WAIT) if protocol == "http" else tgrpc.InferenceServerClient(url)
            try:
                for j in range(400):
                    if stop.is_set():
                        break
                    x = np.full((1, 4), float(i * 1000 + j + 1), np.float32)
                    tensor = module.InferInput("x", [1, 4], "FP32")
                    tensor.set_data_from_numpy(x)
                    try:
                        y = own.infer("m", [tensor]).as_numpy("y")
                    except InferenceServerException as error:
                        if not error.message().startswith(UNLOADED):
                            with lock:
                                errors.append(f"{protocol}: {error.status()} {error.message()}")
                        continue
                    factor = float(y[0, 0] / x[0, 0])
                    if factor not in {1.0, 2.0, 3.0} or not np.array_equal(y, x * factor):
                        with lock:
                            errors.append(f"{protocol}: wrong answer {y} for {x}")
                    with lock:
                        answers[factor] = answers.get(factor, 0) + 1
            finally:
                own.close()

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(32)]
        for thread in threads:
            thread.start()
        try:
            seen = _wait_for(lambda: answers.get(1.0, 0) >= 32, lock)
            assert seen, answers
            c.http.load_model("m", headers=AUTH, config=_factor(2))  # swap under traffic
            assert _wait_for(lambda: answers.get(2.0, 0) >= 32, lock), answers
            c.grpc.unload_model("m", headers=AUTH)
            c.grpc.load_model("m", headers=AUTH, config=_factor(3))
            assert _wait_for(lambda: answers.get(3.0, 0) >= 32, lock), answers
        finally:
            stop.set()
            for thread in threads:
                thread.join(WAIT)
        assert not any(t.is_alive() for t in threads)
        assert errors == []
        for old in (first, factory.built[0]):  # swapped out or unloaded: drained, nothing failed or cancelled
            stats = old.stats()
            assert old.state.value == "closed"
            assert (stats.accepted, sum(stats.failed.values()), stats.cancelled) == (stats.completed, 0, 0)


def _wait_for(condition: Callable[[], bool], lock: threading.Lock) -> bool:
    """Whether ``condition`` (read under ``lock``) came true within WAIT seconds; polls other threads' progress."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        with lock:
            if condition():
                return True
        time.sleep(0.01)
    return False


def _onnx(path: Path, scale: float) -> Path:
    """An ONNX model y = scale * x over float32 [N, 4]."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "k"], ["y"])],
        "scale",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [onnx.numpy_helper.from_array(np.array(scale, dtype=np.float32), "k")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), path)
    return path


class TestConfigLoader:
    """``[server] repository_control``: a load rebuilds a model of the config, within its directory."""

    def test_a_version_that_does_not_load_leaves_nothing_open(self, tmp_path: Path) -> None:
        """Version 2's file is no model: the load fails, and version 1, built first, is closed (its threads end)."""
        _onnx(tmp_path / "one.onnx", 1)
        (tmp_path / "two.onnx").write_bytes(b"not a model")
        config = tmp_path / "models.toml"
        config.write_text('[[models]]\nname = "m"\nversions.1 = { path = "one.onnx" }\n')
        loaded = load(config)
        loaded.repository.close()
        loader = loaded.control.loader
        assert loader is not None
        loader.specs["m"] = {"name": "m", "versions": {"1": {"path": "one.onnx"}, "2": {"path": "two.onnx"}}}
        with pytest.raises(LoadFailed, match=r"failed to load 'm', m\.versions\.2: .*two\.onnx does not load"):
            loader("m", {})
        # conftest's thread guard fails this test if the version 1 the load built outlives it

    def test_serve_refuses_a_file_that_is_no_model(self, tmp_path: Path, capsys: Any) -> None:
        """``inferkit serve bad.onnx``: exit 2 naming the file, not a traceback."""
        bad = tmp_path / "bad.onnx"
        bad.write_bytes(b"not a model")
        assert main(["serve", str(bad), "--grpc-port", "-1", "--port", "0"]) == 2
        assert "bad.onnx does not load: InvalidProtobuf" in capsys.readouterr().err

    def test_new_path_version_and_settings(
        self, start: Callable[..., Clients], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A new path and batching settings for a model; a new file for one version; paths stay under the config."""
        monkeypatch.setenv("INFERKIT_ADMIN_TOKEN", TOKEN)
        for name, scale in (("one", 1), ("two", 2), ("three", 3)):
            _onnx(tmp_path / f"{name}.onnx", scale)
        (tmp_path / "inside").mkdir()
        config = tmp_path / "models.toml"
        config.write_text(
            "[server]\nrepository_control = true\n"
            '[[models]]\nname = "m"\npath = "one.onnx"\n'
            '[[models]]\nname = "clf"\nversions.1 = { path = "one.onnx" }\nversions.2 = { path = "two.onnx" }\n'
        )
        loaded = load(config)
        assert loaded.control.enabled
        c = start(loaded.repository, control=loaded.control)
        x = np.ones((1, 4), np.float32)
        settings = {
            "max_batch_size": 4,
            "dynamic_batching": {"max_queue_delay_microseconds": 500},
            "parameters": {"path": {"string_value": "three.onnx"}},
        }
        c.http.load_model("m", headers=AUTH, config=json.dumps(settings))
        np.testing.assert_array_equal(c.infer("grpc", "m", x), x * 3)
        config_now = c.http.get_model_config("m")
        assert (config_now["max_batch_size"], config_now["dynamic_batching"]["max_queue_delay_microseconds"]) == (
            4,
            500,
        )
        version = {"parameters": {"path": {"string_value": "three.onnx"}, "version": {"string_value": "2"}}}
        c.grpc.load_model("clf", headers=AUTH, config=json.dumps(version))
        np.testing.assert_array_equal(c.infer("http", "clf", x, version="2"), x * 3)
        np.testing.assert_array_equal(c.infer("http", "clf", x), x * 3)  # the highest version answers unpinned
        np.testing.assert_array_equal(c.infer("http", "clf", x, version="1"), x)
        c.http.unload_model("clf", headers=AUTH)  # a version of an unloaded model: a load refused (was a 404)
        error = _grpc_error(lambda: c.http.load_model("clf", headers=AUTH, config=json.dumps(version)))
        assert error.status() == "400"
        assert "failed to load 'clf' version '2': " in error.message()
        assert "load the whole model first" in error.message()
        c.http.load_model("clf", headers=AUTH)
        np.testing.assert_array_equal(c.infer("http", "clf", x), x * 2)
        for path in ("../../etc/passwd", "/etc/passwd", "inside/../../x.onnx"):
            escape = {"parameters": {"path": {"string_value": path}}}
            error = _grpc_error(lambda e=escape: c.grpc.load_model("m", headers=AUTH, config=json.dumps(e)))
            assert error.status() == str(grpc.StatusCode.INVALID_ARGUMENT)
            assert error.message().startswith("failed to load 'm'"), error.message()
            assert "must lie under" in error.message()
        error = _grpc_error(lambda: c.http.load_model("new", headers=AUTH))
        assert "failed to load 'new', failed to poll from model repository" in error.message()
        for field, bad in [("max_queue_delay_microseconds", 1e30), ("max_queue_delay_microseconds", "x")]:
            wrong = {"dynamic_batching": {field: bad}}  # 1e30 was taken as a delay of 10**24 ms
            error = _grpc_error(lambda w=wrong: c.http.load_model("m", headers=AUTH, config=json.dumps(w)))
            assert error.status() == "400"
            assert f"{field} must be a whole number" in error.message(), error.message()
        truncated = {"dynamic_batching": {"default_queue_policy": {"max_queue_size": 2.7}}}  # it became 2
        error = _grpc_error(lambda: c.http.load_model("m", headers=AUTH, config=json.dumps(truncated)))
        assert "max_queue_size must be a whole number" in error.message(), error.message()
        too_large = [  # loaded, then gRPC ModelConfig failed (UNKNOWN); 10**5 replicas built for good, control wedged
            ({"dynamic_batching": {"max_queue_delay_microseconds": "99999999999999999999"}}, "in [0, 2**64)"),
            ({"dynamic_batching": {"default_queue_policy": {"max_queue_size": 2**32}}}, "at most 4294967295"),
            ({"max_batch_size": 2**31}, "max_batch_size must be at most 2147483647"),
            ({"instance_group": [{"count": 257}]}, "replicas must be at most 256"),
        ]
        for config, why in too_large:
            error = _grpc_error(lambda w=config: c.http.load_model("m", headers=AUTH, config=json.dumps(w)))
            assert error.status() == "400"
            assert why in error.message(), error.message()
        as_protobuf_writes_it = {"dynamic_batching": {"max_queue_delay_microseconds": "700"}}  # uint64 in JSON
        c.http.load_model("m", headers=AUTH, config=json.dumps(as_protobuf_writes_it))
        assert c.http.get_model_config("m")["dynamic_batching"]["max_queue_delay_microseconds"] == 700
        np.testing.assert_array_equal(c.infer("grpc", "m", x), x)  # refusals changed nothing; that load reset the path

    def test_cli_needs_a_token(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
        """``--repository-control`` without INFERKIT_ADMIN_TOKEN (or a short one) refuses to start."""
        monkeypatch.delenv("INFERKIT_ADMIN_TOKEN", raising=False)
        model = _onnx(tmp_path / "m.onnx", 1)
        assert main(["serve", str(model), "--repository-control", "--grpc-port", "-1", "--port", "0"]) == 2
        assert "INFERKIT_ADMIN_TOKEN" in capsys.readouterr().err
        monkeypatch.setenv("INFERKIT_ADMIN_TOKEN", "short")
        assert main(["serve", str(model), "--repository-control", "--grpc-port", "-1", "--port", "0"]) == 2
        assert "at least 16 characters" in capsys.readouterr().err
        monkeypatch.setenv("INFERKIT_ADMIN_TOKEN", "tökén-0123456789abcdef")  # sent as UTF-8, it never matched
        assert main(["serve", str(model), "--repository-control", "--grpc-port", "-1", "--port", "0"]) == 2
        assert "printable ASCII" in capsys.readouterr().err
