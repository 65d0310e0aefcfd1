"""Tests for the server's one request pipeline (``inferkit.server.pipeline``) and what it relies on."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from inferkit import Fixed, ModelError, Predictor, Router
from inferkit.server import Repository
from inferkit.server.repository import Failed


def _broken(a: np.ndarray) -> np.ndarray:
    msg = "the model broke"
    raise RuntimeError(msg)


class TestFailed:
    """A failed request comes back as a typed error that carries the arm that had it."""

    def test_a_routed_failure_names_its_arm(self) -> None:
        """The model's error keeps its type and the arm rides beside it, not written onto it."""
        router = Router(
            {"v1": Predictor.from_callable(lambda a: a), "v2": Predictor.from_callable(_broken)}, Fixed("v2")
        )
        repository = Repository({"m": router})
        try:
            with pytest.raises(Failed) as caught:
                asyncio.run(repository.infer("m", None, {"x": np.ones((1, 2))}))
            assert isinstance(caught.value.error, ModelError)
            assert caught.value.arm == "v2"
            assert not hasattr(caught.value.error, "arm")
        finally:
            repository.close()

    def test_an_unrouted_failure_has_no_arm(self) -> None:
        """Without a Router the arm is ``None``."""
        repository = Repository({"m": Predictor.from_callable(_broken)})
        try:
            with pytest.raises(Failed) as caught:
                asyncio.run(repository.infer("m", None, {"x": np.ones((1, 2))}))
            assert isinstance(caught.value.error, ModelError)
            assert caught.value.arm is None
        finally:
            repository.close()
