"""Summaries: the report's own figures, the table's layout, and a Keras reference for every
experiment (the counts and shapes against Keras's, model by model: tests/test_keras.py)."""

import pytest

import keras_models
from jaxlab.experiment import build_model
from jaxlab.experiment import experiment_names
from jaxlab.inspection.summary import format_summary, summarize


def test_every_experiment_has_a_keras_reference():
  assert set(keras_models.LAB02_WITH_CODE) <= set(keras_models.MODELS)
  assert set(keras_models.MODELS) == set(experiment_names())


@pytest.mark.parametrize("name,total,non_trainable", [
    ("vgg_fashion_mnist", 33_642_954, 2_944),  # The figures printed in the Lab 04 report.
    ("vgg_cifar10", 39_935_562, 2_944),
])
def test_report_figures(name, total, non_trainable):
  summary = summarize(build_model(name), build_model(name).input_shape())
  assert (summary["total_params"], summary["non_trainable_params"]) == (total, non_trainable)


def test_format_summary_lists_layers_and_totals():
  summary = summarize(build_model("mlp_dropout"), (28, 28, 1))
  text = format_summary(summary, "mlp_dropout")
  assert "dense_4 (Dense)" in text and "(None, 10)" in text
  assert f"Total params: {summary['total_params']:,}" in text
  assert f"Non-trainable params: {summary['non_trainable_params']:,}" in text
  assert len(text.splitlines()) == len(summary["layers"]) + 9
