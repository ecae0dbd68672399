"""Keras, model by model: every catalog architecture has Keras's own parameter counts and
output shapes (the CNNs at both input sizes), and with Keras's weights imported computes what
the report's Keras model computes, layer by layer; the weights travel both ways.

Each Keras model (an experiment at one input size) is built once, by the module-scoped fixture
`reference`, for every test that reads it: pytest runs those tests together and lets the model
go before it builds the next, so one Keras model at a time is alive."""

import dataclasses
import json

import numpy as np
import pytest

import keras_models
from jaxlab.compare import assert_layers_close, capture, compare
from jaxlab.experiment import build_model
from jaxlab.keras.model import KerasWeightsError, keras_capture, keras_order
from jaxlab.keras.weights import export_keras, import_keras_weights
from jaxlab.models import MLP, Dense, iter_ops
from jaxlab.summary import summarize
from conftest import run_main

RTOL = 1e-5  # float32 against float32, both on XLA: differences are rounding only.
DATASETS = {(28, 28, 1): "fashion_mnist", (32, 32, 3): "cifar10"}


def case(name, shape=None):
  """Experiment `name` at input size `shape` (default: its own), for the `reference` fixture."""
  shape = tuple(shape or keras_models.LAB04_SHAPES.get(name, (784,)))
  return pytest.param((name, shape), id=f"{name}-{'x'.join(map(str, shape))}")


def models(*cases):
  """Parametrizes a test over the Keras models of `cases`, built by the module's fixture."""
  return pytest.mark.parametrize("reference", cases, indirect=True, scope="module")


EVERY_MODEL = [case(name) for name in sorted(keras_models.MODELS)]
EVERY_CNN_AT_BOTH_SIZES = [case(name, shape) for name in sorted(keras_models.LAB04_BUILDERS)
                           for shape in DATASETS]


@dataclasses.dataclass
class Reference:
  """The report's Keras model of an experiment at one input size, and jaxlab's model of it."""

  name: str
  keras: object
  model: object


@pytest.fixture(scope="module")
def reference(request):
  name, shape = request.param
  dataset = DATASETS.get(shape)  # None: the experiment's own (an MLP's).
  return Reference(name, keras_models.build(name, shape), build_model(name, dataset))


def randomize(keras_model, seed=0):
  """Random kernels stay Keras's Glorot draws; biases, BatchNorm scales, offsets, moving means
  and moving variances get random values so that every variable matters."""
  rng = np.random.default_rng(seed)
  for layer in keras_model.layers:
    kind = type(layer).__name__
    if kind == "BatchNormalization":
      draws = [rng.normal(1, 0.2, layer.gamma.shape), rng.normal(0, 0.2, layer.beta.shape),
               rng.normal(0, 0.2, layer.moving_mean.shape),
               rng.uniform(0.5, 1.5, layer.moving_variance.shape)]
      layer.set_weights([np.asarray(w, np.float32) for w in draws])
    elif kind in ("Dense", "Conv2D"):  # The kernel is left where it is (not copied out and in).
      layer.bias.assign(np.asarray(rng.normal(0, 0.1, layer.bias.shape), np.float32))
  return keras_model


def saved(keras_model, directory, name="model.weights.h5"):
  path = directory / name
  keras_model.save_weights(path)
  return str(path)


@pytest.mark.slow
@models(*EVERY_MODEL)
def test_counts_and_shapes_match_keras(reference):
  summary = summarize(reference.model, reference.model.input_shape())
  counts = keras_models.counts(reference.keras)
  assert {k: summary[k] for k in counts} == counts
  keras_layers = [l for l in reference.keras.layers if type(l).__name__ != "InputLayer"]
  # Keras lists a functional model's layers by depth; compare as a set of (type, shape, params).
  expected = sorted((type(l).__name__, tuple(l.output.shape[1:]), l.count_params())
                    for l in keras_layers)
  got = sorted((l["type"], tuple(l["output_shape"][1:]), l["params"]) for l in summary["layers"])
  assert got == expected


@pytest.mark.slow
@models(*EVERY_CNN_AT_BOTH_SIZES)
def test_cnn_block_shapes_match_keras_for_both_input_sizes(reference):
  summary = summarize(reference.model, reference.model.input_shape())
  shape = tuple(reference.keras.input_shape[1:])
  assert summary["input_shape"] == [None, *shape]
  expected = [(type(l).__name__, tuple(l.output.shape[1:]), l.count_params())
              for l in reference.keras.layers]
  got = [(l["type"], tuple(l["output_shape"][1:]), l["params"]) for l in summary["layers"]]
  assert got == expected


@pytest.mark.slow
@models(*EVERY_MODEL)
def test_every_layer_matches_keras(reference, tmp_path):
  model = reference.model
  variables = import_keras_weights(model, saved(randomize(reference.keras), tmp_path))
  batch = 2 if reference.name.startswith(("vgg", "alexnet")) else 16
  x = np.random.default_rng(1).random((batch,) + model.input_shape(), dtype=np.float32)
  ours = capture(model, variables, x, softmax_output=True)
  theirs = keras_capture(reference.keras, model, x)
  assert list(ours) == [op.name for op in iter_ops(model.plan())]
  assert_layers_close(ours, theirs, rtol=RTOL)


@models(case("mlp_parallel_paths"))
def test_keras_order_matches_keras_layer_order(reference, tmp_path):
  model, net = reference.model, reference.keras
  keras_types = [type(l).__name__ for l in net.layers if type(l).__name__ != "InputLayer"]
  assert [op.keras_type for op in keras_order(model)] == keras_types
  shapes = [tuple(l.output.shape[1:]) for l in net.layers[1:]]
  ours = capture(model, import_keras_weights(model, saved(net, tmp_path)),
                 np.zeros((1, 784), np.float32))
  assert [ours[op.name].shape[1:] for op in keras_order(model)] == shapes


@pytest.mark.slow
@models(case("mlp_halving"))
def test_comparison_names_the_first_divergent_layer(reference, tmp_path):
  model, net = reference.model, randomize(reference.keras)
  variables = import_keras_weights(model, saved(net, tmp_path))
  variables["params"]["dense_2"]["bias"] = variables["params"]["dense_2"]["bias"] + 0.5
  x = np.random.default_rng(0).random((4, 784), dtype=np.float32)
  result = compare(capture(model, variables, x, softmax_output=True), keras_capture(net, model, x))
  assert not result.ok and result.first_divergence().name == "dense_2"
  assert [l.name for l in result.layers[:4]] == ["dense", "batch_normalization", "dense_1",
                                                 "batch_normalization_1"]
  assert all(l.max_rel < RTOL for l in result.layers[:4])  # Every layer before dense_2 agrees.
  with pytest.raises(AssertionError, match="layer 'dense_2' diverges"):
    assert_layers_close(capture(model, variables, x, softmax_output=True),
                        keras_capture(net, model, x))
  missing = compare({"a": np.zeros(3)}, {"a": np.zeros(3), "b": np.ones(2)})
  assert missing.first_divergence().name == "b"
  shaped = compare({"a": np.zeros((2, 3))}, {"a": np.zeros((3, 2))})
  assert "has shape (2, 3), reference (3, 2)" in shaped.table()


@models(case("mlp_dropout"))
def test_capture_in_train_mode_applies_dropout_and_batch_statistics(reference, tmp_path):
  model = reference.model
  variables = import_keras_weights(model, saved(randomize(reference.keras), tmp_path))
  x = np.random.default_rng(0).random((32, 784), dtype=np.float32)
  train = capture(model, variables, x, train=True)
  evaluation = capture(model, variables, x)
  assert (train["dropout"] == 0).mean() > 0.3  # Rate 0.5.
  np.testing.assert_array_equal(evaluation["dropout"], evaluation["batch_normalization"])
  bn = train["batch_normalization"]
  np.testing.assert_allclose(bn.mean(0), variables["params"]["batch_normalization"]["bias"],
                             atol=1e-4)  # Normalized by the batch's own statistics.


@pytest.mark.slow
@models(case("mlp_parallel_paths"), case("alexnet_pool_stride"))
@pytest.mark.parametrize("suffix", [".keras", ".weights.h5"])
def test_round_trip_jaxlab_keras_jaxlab_is_identical(reference, tmp_path, suffix):
  model = reference.model
  variables = import_keras_weights(model, saved(randomize(reference.keras, seed=3), tmp_path))
  path = str(tmp_path / f"m{suffix}")
  export_keras(model, variables, path)
  again = import_keras_weights(model, path)
  for collection in ("params", "batch_stats"):
    for layer, vars_ in variables[collection].items():
      for var, value in vars_.items():
        np.testing.assert_array_equal(again[collection][layer][var], value)


@models(case("mlp_halving"))
def test_wrong_experiment_is_refused_naming_layers_and_shapes(reference, tmp_path):
  path = saved(reference.keras, tmp_path, "halving.weights.h5")
  with pytest.raises(KerasWeightsError, match="6 Dense layers with weights but the model has 4"):
    import_keras_weights(build_model("mlp_baseline"), path)
  with pytest.raises(KerasWeightsError,
                     match=r"Keras layer 'dense' variable kernel has shape \(784, 512\) but "
                           r"jaxlab layer 'dense' needs \(784, 128\)"):
    import_keras_weights(MLP(layers=tuple(Dense(n) for n in (128, 256, 128, 64, 32))), path)


@pytest.mark.slow
@models(case("mlp_parallel_paths"), case("alexnet_pool_stride"))
def test_import_predict_match_keras_predict_through_the_scripts(reference, tmp_path):
  name, net = reference.name, randomize(reference.keras, seed=5)
  weights = tmp_path / f"{name}.keras"
  net.save(weights)
  run = tmp_path / name
  imported = run_main("import_keras.py", f"--experiment={name}", f"--keras_weights={weights}",
                      f"--workdir={run}")
  assert imported.returncode == 0, imported.stderr
  model = reference.model
  x = np.random.default_rng(2).random((6,) + model.input_shape(), dtype=np.float32)
  np.save(tmp_path / "x.npy", x)
  predicted = run_main("predict.py", f"--workdir={run}", f"--inputs={tmp_path / 'x.npy'}",
                       f"--output={tmp_path / 'p.npy'}")
  assert predicted.returncode == 0, predicted.stderr
  np.testing.assert_allclose(np.load(tmp_path / "p.npy"), net.predict(x, verbose=0), rtol=1e-5,
                             atol=1e-6)
  assert json.loads((run / "metrics.json").read_text())["status"] == "imported"


@pytest.mark.slow
@models(case("mlp_halving"))
def test_script_errors_are_one_line(reference, tmp_path):
  weights = saved(reference.keras, tmp_path, "h.weights.h5")
  bad = run_main("import_keras.py", "--experiment=mlp_baseline", f"--keras_weights={weights}",
                 f"--workdir={tmp_path / 'run'}")
  assert bad.returncode == 2 and "Traceback" not in bad.stderr
  assert "Dense layers with weights but the model has" in bad.stderr
  good = run_main("import_keras.py", "--experiment=mlp_halving", f"--keras_weights={weights}",
                  f"--workdir={tmp_path / 'run'}")
  assert good.returncode == 0 and f"run directory: {tmp_path / 'run'}" in good.stdout
  np.save(tmp_path / "bad.npy", np.zeros((3, 28, 28, 1), np.float32))
  shape = run_main("predict.py", f"--workdir={tmp_path / 'run'}",
                   f"--inputs={tmp_path / 'bad.npy'}", f"--output={tmp_path / 'p.npy'}")
  assert shape.returncode == 2 and "has shape (3, 28, 28, 1); mlp_halving takes (N, 784)" in \
      shape.stderr
  table = run_main("compare_layers.py", "--experiment=mlp_halving", f"--keras_weights={weights}",
                   "--batch_size=4")
  assert table.returncode == 0 and "all 12 layers within max rel err 1e-05" in table.stdout
  again = run_main("import_keras.py", "--experiment=mlp_halving", f"--keras_weights={weights}",
                   f"--workdir={tmp_path / 'run'}")
  assert again.returncode == 2 and "already holds a run" in again.stderr
