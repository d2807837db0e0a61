"""SageMaker's entry points for this container; the work is in ``twostage_rec.handler``."""

from twostage_rec.handler import input_fn, model_fn, output_fn, predict_fn

__all__ = ["model_fn", "input_fn", "predict_fn", "output_fn"]
