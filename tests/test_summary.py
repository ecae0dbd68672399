"""Parameter counts and output shapes against Keras's own, model by model."""

import pytest

import keras_models
from jaxlab.experiment import build_model
from jaxlab.experiment import experiment_names
from jaxlab.summary import format_summary, summarize


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(keras_models.MODELS))
def test_counts_and_shapes_match_keras(name):
  reference = keras_models.build(name)
  summary = summarize(build_model(name))
  assert {k: summary[k] for k in keras_models.counts(reference)} == keras_models.counts(reference)
  keras_layers = [l for l in reference.layers if type(l).__name__ != "InputLayer"]
  # Keras lists a functional model's layers by depth; compare as a set of (type, shape, params).
  expected = sorted((type(l).__name__, tuple(l.output.shape[1:]), l.count_params())
                    for l in keras_layers)
  got = sorted((l["type"], tuple(l["output_shape"][1:]), l["params"]) for l in summary["layers"])
  assert got == expected


def test_every_experiment_has_a_keras_reference():
  assert set(keras_models.LAB02_WITH_CODE) <= set(keras_models.MODELS)
  assert set(keras_models.MODELS) == set(experiment_names())


@pytest.mark.parametrize("name,total,non_trainable", [
    ("vgg_fashion_mnist", 33_642_954, 2_944),  # The figures printed in the Lab 04 report.
    ("vgg_cifar10", 39_935_562, 2_944),
])
def test_report_figures(name, total, non_trainable):
  summary = summarize(build_model(name))
  assert (summary["total_params"], summary["non_trainable_params"]) == (total, non_trainable)


def test_format_summary_lists_layers_and_totals():
  summary = summarize(build_model("mlp_dropout"))
  text = format_summary(summary, "mlp_dropout")
  assert "dense_4 (Dense)" in text and "(None, 10)" in text
  assert f"Total params: {summary['total_params']:,}" in text
  assert f"Non-trainable params: {summary['non_trainable_params']:,}" in text
  assert len(text.splitlines()) == len(summary["layers"]) + 9


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(keras_models.LAB04_BUILDERS))
@pytest.mark.parametrize("dataset,shape", [("fashion_mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_cnn_block_shapes_match_keras_for_both_input_sizes(name, dataset, shape):
  reference = keras_models.build(name, shape)
  summary = summarize(build_model(name, dataset))
  assert summary["input_shape"] == [None, *shape]
  expected = [(type(l).__name__, tuple(l.output.shape[1:]), l.count_params())
              for l in reference.layers]
  got = [(l["type"], tuple(l["output_shape"][1:]), l["params"]) for l in summary["layers"]]
  assert got == expected
