"""Tests for the steps of inferkit.gpu.pre and inferkit.gpu.post: the limits they check, when built and per batch."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from inferkit import InvalidInput, ModelError, PipelineMismatch, Predictor, TensorSpec
from inferkit.gpu import NMS, ArgMax, ImageToTensor, Pipeline, Softmax, Threshold, twins
from inferkit.gpu.step import CPU

WAIT = 30


class TestSettingsOutOfRange:
    @pytest.mark.parametrize(
        ("make", "message"),
        [
            # finite as Python floats, inf in float32 where they are compared: never fired, every answer a 200
            (lambda: Threshold(1e39), "threshold must be within float32's range"),
            (lambda: Threshold(-1e39), "threshold must be within float32's range"),
            (lambda: NMS(score_threshold=1e39), "score_threshold must be within float32's range"),
            # (255 / 255 - 0) / 1e-5 = 1e5: finite in float32, inf in a float16 output
            (lambda: ImageToTensor(std=(1e-5, 1, 1), dtype="float16"), "overflow float16.*past 65504"),
            (lambda: ImageToTensor(mean=(-700, 0, 0), std=(0.01, 1, 1), dtype="float16"), "overflow float16"),
        ],
    )
    def test_a_value_that_becomes_inf_where_it_is_used_fails_when_built(self, make: Any, message: str) -> None:
        """Settings are checked in the float type they are used in, not as Python floats."""
        with pytest.raises(ValueError, match=message):
            make()

    def test_the_same_settings_in_range_build(self) -> None:
        """The largest float32 is a threshold; std=1e-5 fits a float32 output."""
        assert Threshold(float(np.finfo(np.float32).max)).threshold > 0
        white = {"x": np.full((1, 1, 1, 3), 255, np.uint8)}
        assert np.isfinite(ImageToTensor(std=(1e-5, 1, 1))(white, CPU)["x"]).all()  # float32: 1e5 is finite

    @pytest.mark.parametrize("threshold", [7e4, -7e4])
    def test_a_threshold_past_a_float16_outputs_range_is_a_mismatch(self, threshold: float) -> None:
        """No finite float16 lies above 7e4 (or below -7e4): the mask was constant; now refused at construction."""
        spec = [TensorSpec("y", np.float16, (None, 3))]
        with pytest.raises(PipelineMismatch, match="outside the range of 'y'"):
            Predictor.from_callable(
                lambda x: x, inputs=spec, outputs=spec, pipeline=Pipeline(post=[Threshold(threshold)])
            )
        wide = [TensorSpec("y", np.float32, (None, 3))]
        with Predictor.from_callable(
            lambda x: x, inputs=wide, outputs=wide, pipeline=Pipeline(post=[Threshold(threshold)])
        ) as predictor:
            got = predictor.predict(np.array([[1e5, -1e5, 0]], np.float32))
        assert got.tolist() == [[True, False, threshold < 0]]


class TestNmsBoxLimit:
    def test_a_model_declaring_more_boxes_fails_when_built(self) -> None:
        """B past the limit took gigabytes of mask an image and, past 393,216, a raw CUDA launch error per batch."""
        b = twins.NMS_MAX_BOXES + 1
        sig = [TensorSpec("boxes", np.float32, (None, b, 4)), TensorSpec("scores", np.float32, (None, b))]
        with pytest.raises(PipelineMismatch, match=f"at most {twins.NMS_MAX_BOXES} boxes an image"):
            Predictor.from_callable(lambda d: d, inputs=sig, outputs=sig, pipeline=Pipeline(post=[NMS()]))

    def test_a_batch_of_more_boxes_is_that_requests_error(self) -> None:
        """An undeclared box count over the limit is the request's InvalidInput; the limit itself runs."""
        with Predictor.from_callable(lambda d: d, pipeline=Pipeline(post=[NMS(max_detections=2)])) as predictor:
            for b, fits in ((twins.NMS_MAX_BOXES + 1, False), (twins.NMS_MAX_BOXES, True)):
                boxes = np.zeros((1, b, 4), np.float32)
                boxes[0, :, 2:] = 1 + np.arange(b, dtype=np.float32)[:, None]
                scores = np.zeros((1, b), np.float32)
                scores[0, :2] = (0.9, 0.8)
                request = {"boxes": boxes, "scores": scores}
                if fits:
                    assert predictor.predict(request)["keep"].tolist() == [[0, 1]]
                else:
                    with pytest.raises(InvalidInput, match=f"at most {twins.NMS_MAX_BOXES} boxes"):
                        predictor.predict(request)
            stats = predictor.stats()
        assert [r.failed_batches for r in stats.replicas] == [0]


class TestReducedAxis:
    @pytest.mark.parametrize("step", [Softmax(axis=3), ArgMax(axis=-3)])
    def test_an_axis_an_undeclared_output_lacks_is_refused_by_name(self, step: Any) -> None:
        """Wrapped past the batch check (3 % 2 == 1), it failed as an IndexError of a shape tuple; now the rule
        that refuses it when the output is declared refuses it per batch, naming the axis."""
        with Predictor.from_callable(lambda x: x, pipeline=Pipeline(post=[step])) as predictor:
            with pytest.raises(ModelError, match=f"axis {step.axis} is out of range for an output of 2 axes"):
                predictor.predict(np.zeros((1, 3), np.float32))
