"""Parity with Keras: every catalog architecture, with Keras's own weights imported, computes
what the report's Keras model computes, layer by layer; and the weights travel both ways."""

import json

import numpy as np
import pytest

import keras_models
from jaxlab.compare import assert_layers_close, capture, compare
from jaxlab.experiment import build_model
from jaxlab.keras_io import (KerasWeightsError, export_keras, import_keras_weights, keras_capture,
                             keras_order)
from jaxlab.models import MLP, Dense, iter_ops
from conftest import script

RTOL = 1e-5  # float32 against float32, both on XLA: differences are rounding only.


def randomize(keras_model, seed=0):
  """Random kernels stay Keras's Glorot draws; biases, BatchNorm scales, offsets, moving means
  and moving variances get random values so that every variable matters."""
  rng = np.random.default_rng(seed)
  for layer in keras_model.layers:
    weights = layer.get_weights()
    if not weights:
      continue
    if type(layer).__name__ == "BatchNormalization":
      gamma, beta, mean, var = (w.shape for w in weights)
      weights = [rng.normal(1, 0.2, gamma), rng.normal(0, 0.2, beta), rng.normal(0, 0.2, mean),
                 rng.uniform(0.5, 1.5, var)]
    else:
      weights = [weights[0], rng.normal(0, 0.1, weights[1].shape)]
    layer.set_weights([np.asarray(w, np.float32) for w in weights])
  return keras_model


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("keras")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(keras_models.MODELS))
def test_every_layer_matches_keras(name, weights_dir):
  reference = randomize(keras_models.build(name))
  path = weights_dir / f"{name}.weights.h5"
  reference.save_weights(path)
  model = build_model(name)
  variables = import_keras_weights(model, str(path))
  batch = 2 if name.startswith(("vgg", "alexnet")) else 16
  x = np.random.default_rng(1).random((batch,) + model.input_shape(), dtype=np.float32)
  ours = capture(model, variables, x, softmax_output=True)
  theirs = keras_capture(reference, model, x)
  assert list(ours) == [op.name for op in iter_ops(model.plan())]
  assert_layers_close(ours, theirs, rtol=RTOL)
  path.unlink()


def test_keras_order_matches_keras_layer_order():
  model = build_model("mlp_parallel_paths")
  reference = keras_models.build("mlp_parallel_paths")
  keras_types = [type(l).__name__ for l in reference.layers if type(l).__name__ != "InputLayer"]
  assert [op.keras_type for op in keras_order(model)] == keras_types
  shapes = [tuple(l.output.shape[1:]) for l in reference.layers[1:]]
  ours = capture(model, import_keras_weights(model, _saved(reference)),
                 np.zeros((1, 784), np.float32))
  assert [ours[op.name].shape[1:] for op in keras_order(model)] == shapes


def _saved(keras_model, path="/tmp/jaxlab-test-order.weights.h5"):
  keras_model.save_weights(path)
  return path


@pytest.mark.slow
def test_comparison_names_the_first_divergent_layer():
  model = build_model("mlp_halving")
  reference = randomize(keras_models.build("mlp_halving"))
  variables = import_keras_weights(model, _saved(reference))
  variables["params"]["dense_2"]["bias"] = variables["params"]["dense_2"]["bias"] + 0.5
  x = np.random.default_rng(0).random((4, 784), dtype=np.float32)
  result = compare(capture(model, variables, x, softmax_output=True),
                   keras_capture(reference, model, x))
  assert not result.ok and result.first_divergence().name == "dense_2"
  assert [l.name for l in result.layers[:4]] == ["dense", "batch_normalization", "dense_1",
                                                 "batch_normalization_1"]
  assert all(l.max_rel < RTOL for l in result.layers[:4])  # Every layer before dense_2 agrees.
  with pytest.raises(AssertionError, match="layer 'dense_2' diverges"):
    assert_layers_close(capture(model, variables, x, softmax_output=True),
                        keras_capture(reference, model, x))
  missing = compare({"a": np.zeros(3)}, {"a": np.zeros(3), "b": np.ones(2)})
  assert missing.first_divergence().name == "b"
  shaped = compare({"a": np.zeros((2, 3))}, {"a": np.zeros((3, 2))})
  assert "has shape (2, 3), reference (3, 2)" in shaped.table()


def test_capture_in_train_mode_applies_dropout_and_batch_statistics():
  model = build_model("mlp_dropout")
  reference = randomize(keras_models.build("mlp_dropout"))
  variables = import_keras_weights(model, _saved(reference))
  x = np.random.default_rng(0).random((32, 784), dtype=np.float32)
  train = capture(model, variables, x, train=True)
  evaluation = capture(model, variables, x)
  assert (train["dropout"] == 0).mean() > 0.3  # Rate 0.5.
  np.testing.assert_array_equal(evaluation["dropout"], evaluation["batch_normalization"])
  bn = train["batch_normalization"]
  np.testing.assert_allclose(bn.mean(0), variables["params"]["batch_normalization"]["bias"],
                             atol=1e-4)  # Normalized by the batch's own statistics.


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mlp_parallel_paths", "alexnet_pool_stride"])
@pytest.mark.parametrize("suffix", [".keras", ".weights.h5"])
def test_round_trip_jaxlab_keras_jaxlab_is_identical(tmp_path, name, suffix):
  model = build_model(name)
  reference = randomize(keras_models.build(name), seed=3)
  variables = import_keras_weights(model, _saved(reference))
  path = str(tmp_path / f"m{suffix}")
  export_keras(model, variables, path)
  again = import_keras_weights(model, path)
  for collection in ("params", "batch_stats"):
    for layer, vars_ in variables[collection].items():
      for var, value in vars_.items():
        np.testing.assert_array_equal(again[collection][layer][var], value)


def test_wrong_experiment_is_refused_naming_layers_and_shapes(tmp_path):
  reference = keras_models.build("mlp_halving")
  path = _saved(reference, str(tmp_path / "halving.weights.h5"))
  with pytest.raises(KerasWeightsError, match="6 Dense layers with weights but the model has 4"):
    import_keras_weights(build_model("mlp_baseline"), path)
  with pytest.raises(KerasWeightsError,
                     match=r"Keras layer 'dense' variable kernel has shape \(784, 512\) but "
                           r"jaxlab layer 'dense' needs \(784, 128\)"):
    import_keras_weights(MLP(layers=tuple(Dense(n) for n in (128, 256, 128, 64, 32))), path)


@pytest.mark.slow
def test_import_predict_match_keras_predict_through_the_scripts(tmp_path):
  for name in ("mlp_parallel_paths", "alexnet_pool_stride"):
    reference = randomize(keras_models.build(name), seed=5)
    weights = tmp_path / f"{name}.keras"
    reference.save(weights)
    run = tmp_path / name
    script("import_keras.py", f"--experiment={name}", f"--keras_weights={weights}",
           f"--workdir={run}")
    model = build_model(name)
    x = np.random.default_rng(2).random((6,) + model.input_shape(), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    script("predict.py", f"--workdir={run}", f"--inputs={tmp_path / 'x.npy'}",
           f"--output={tmp_path / 'p.npy'}")
    ours = np.load(tmp_path / "p.npy")
    theirs = reference.predict(x, verbose=0)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    assert json.loads((run / "metrics.json").read_text())["status"] == "imported"


@pytest.mark.slow
def test_script_errors_are_one_line(tmp_path):
  reference = keras_models.build("mlp_halving")
  weights = tmp_path / "h.weights.h5"
  reference.save_weights(weights)
  bad = script("import_keras.py", "--experiment=mlp_baseline", f"--keras_weights={weights}",
               f"--workdir={tmp_path / 'run'}", check=False)
  assert bad.returncode == 2 and "Traceback" not in bad.stderr
  assert "Dense layers with weights but the model has" in bad.stderr
  good = script("import_keras.py", "--experiment=mlp_halving", f"--keras_weights={weights}",
                f"--workdir={tmp_path / 'run'}")
  assert f"run directory: {tmp_path / 'run'}" in good.stdout
  np.save(tmp_path / "bad.npy", np.zeros((3, 28, 28, 1), np.float32))
  shape = script("predict.py", f"--workdir={tmp_path / 'run'}", f"--inputs={tmp_path / 'bad.npy'}",
                 f"--output={tmp_path / 'p.npy'}", check=False)
  assert shape.returncode == 2 and "has shape (3, 28, 28, 1); mlp_halving takes (N, 784)" in \
      shape.stderr
  table = script("compare_layers.py", "--experiment=mlp_halving", f"--keras_weights={weights}",
                 "--batch_size=4")
  assert "all 12 layers within max rel err 1e-05" in table.stdout
  again = script("import_keras.py", "--experiment=mlp_halving", f"--keras_weights={weights}",
                 f"--workdir={tmp_path / 'run'}", check=False)
  assert again.returncode == 2 and "already holds a run" in again.stderr
