"""Starting and stopping a server's loop from other threads: :class:`inferkit.server.lifecycle.Lifecycle`."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from inferkit import Predictor, TensorSpec
from inferkit.server import Repository
from inferkit.server.lifecycle import Lifecycle
from inferkit.server.run import InferenceServer, run_loop

WAIT = 60


def _serve(lifecycle: Lifecycle, served: threading.Event) -> None:
    """What a server's run() does with its lifecycle: begin, announce, wait for the stop."""

    async def main() -> None:
        stop = lifecycle.begin(handle_signals=False)
        lifecycle.started.set()
        await stop.wait()
        served.set()

    run_loop(main(), "asyncio")


class TestLifecycle:
    """begin, stop, start_thread, join."""

    def test_stop_before_begin_is_a_no_op(self) -> None:
        """Nothing is serving yet: stop() neither raises nor leaves a stop behind."""
        lifecycle = Lifecycle()
        lifecycle.stop()
        lifecycle.join(WAIT)  # no thread either
        assert lifecycle.running is None
        assert not lifecycle.started.is_set()

    def test_stop_from_another_thread_ends_serving(self) -> None:
        """start_thread returns once started; join() from this thread ends the loop's wait and the thread."""
        lifecycle = Lifecycle()
        served = threading.Event()
        lifecycle.start_thread(lambda: _serve(lifecycle, served), WAIT)
        assert lifecycle.running is not None
        assert lifecycle.thread is not None
        assert lifecycle.thread.is_alive()
        lifecycle.join(WAIT)
        assert served.is_set()
        assert not lifecycle.thread.is_alive()

    def test_a_server_that_never_starts_times_out(self) -> None:
        """start_thread gives up after its timeout when started is never set."""
        lifecycle = Lifecycle()
        release = threading.Event()
        with pytest.raises(TimeoutError, match="did not start in time"):
            lifecycle.start_thread(lambda: release.wait(WAIT), 0.05)
        release.set()
        assert lifecycle.thread is not None
        lifecycle.thread.join(WAIT)
        assert not lifecycle.thread.is_alive()

    def test_begin_publishes_the_loop_and_its_stop_together(self) -> None:
        """The Running value names the loop that serves and the event stop() sets on it."""
        lifecycle = Lifecycle()

        async def main() -> bool:
            stop = lifecycle.begin(handle_signals=False)
            running = lifecycle.running
            assert running is not None
            return running.loop is asyncio.get_running_loop() and running.stop is stop

        assert run_loop(main(), "asyncio")


class TestServerPorts:
    """The ports asked for until started, then the bound ones."""

    def test_ports_before_and_after_start(self) -> None:
        """Port 0 reads 0 until started, then the port bound; the settings read back unchanged."""
        predictor = Predictor.from_callable(lambda x: x, inputs=[TensorSpec("x", np.float32, (None, 4))])
        server = InferenceServer(Repository({"m": predictor}), port=0, grpc_port=0, grace=WAIT, loop="asyncio")
        assert (server.port, server.grpc_port, server.host, server.loop) == (0, 0, "127.0.0.1", "asyncio")
        assert server.grace == WAIT
        assert server.status_page  # loopback host
        assert not server.started.is_set()
        server.start(WAIT)
        try:
            assert server.started.is_set()
            assert server.port > 0
            assert server.grpc_port is not None
            assert server.grpc_port > 0
            assert server.port != server.grpc_port
        finally:
            server.join(WAIT)
