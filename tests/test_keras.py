"""Keras, model by model: every catalog architecture has Keras's own parameter counts and
output shapes (the CNNs at both input sizes), and with Keras's weights imported computes what
the report's Keras model computes, layer by layer; the weights travel both ways.

Each Keras model (an experiment at one input size) is built once, by the module-scoped fixture
`reference`, for every test that reads it: pytest runs those tests together and lets the model
go before it builds the next, so one Keras model at a time is alive."""

import dataclasses
import json

import jax
import numpy as np
import optax
import pytest

import keras_models
from jaxlab.inspection.compare import assert_layers_close, capture, compare
from jaxlab.experiment import build_model
from jaxlab.keras.model import KerasWeightsError, import_keras, keras_capture, keras_order
from jaxlab.keras.weights import export_keras, import_keras_weights
from jaxlab.models import MLP, Dense, iter_ops
from jaxlab.optim import make_optimizer, with_learning_rate
from jaxlab.inspection.summary import summarize
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
  """The exported file read back by jaxlab holds the same arrays, and opened by Keras itself
  (`keras.models.load_model`, or a `.weights.h5` loaded into Keras's own model of the
  architecture) predicts what jaxlab predicts."""
  model = reference.model
  variables = import_keras_weights(model, saved(randomize(reference.keras, seed=3), tmp_path))
  path = str(tmp_path / f"m{suffix}")
  export_keras(model, variables, path)
  again = import_keras_weights(model, path)
  for collection in ("params", "batch_stats"):
    for layer, vars_ in variables[collection].items():
      for var, value in vars_.items():
        np.testing.assert_array_equal(again[collection][layer][var], value)
  if suffix == ".keras":
    net = import_keras().models.load_model(path)
  else:
    net = keras_models.build(reference.name, model.input_shape())
    net.load_weights(path)
  x = np.random.default_rng(4).random((5, *model.input_shape()), dtype=np.float32)
  ours = np.asarray(jax.nn.softmax(model.apply(variables, x), axis=-1))
  np.testing.assert_allclose(net.predict(x, verbose=0), ours, rtol=RTOL, atol=1e-6)


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
  from jaxlab.keras import weights as keras_weights  # jaxlab's importer, now with a wrong bias:

  def off(model, path):
    found = import_keras_weights(model, path)
    found["params"]["dense_2"]["bias"] = found["params"]["dense_2"]["bias"] + 0.5
    return found
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(keras_weights, "import_keras_weights", off)
    diverged = run_main("compare_layers.py", "--experiment=mlp_halving",
                        f"--keras_weights={weights}", "--batch_size=4")
  assert diverged.returncode == 1 and "Traceback" not in diverged.stderr
  assert "layer 'dense_2' diverges" in diverged.stdout
  again = run_main("import_keras.py", "--experiment=mlp_halving", f"--keras_weights={weights}",
                   f"--workdir={tmp_path / 'run'}")
  assert again.returncode == 2 and "already holds a run" in again.stderr


# ----------------------------------------------------------------------------- Keras's defaults
# What the README says jaxlab reproduces of Keras, checked against Keras's own objects built
# with their defaults (not against jaxlab's constants).


@pytest.mark.parametrize("name,keras_optimizer", [
    ("adam", lambda keras: keras.optimizers.Adam(learning_rate=0.01)),
    ("sgd", lambda keras: keras.optimizers.SGD(learning_rate=0.01)),
    ("momentum", lambda keras: keras.optimizers.SGD(learning_rate=0.01, momentum=0.9)),
    ("nadam", lambda keras: keras.optimizers.Nadam(learning_rate=0.01)),
    ("rmsprop", lambda keras: keras.optimizers.RMSprop(learning_rate=0.01)),
])
def test_each_optimizer_steps_as_kerass_own_with_its_defaults(name, keras_optimizer):
  """Five steps on the same parameters and gradients: `--optimizer=NAME` and Keras's optimizer
  given only the learning rate (momentum's 0.9 is the README's word for it)."""
  rng = np.random.default_rng(0)
  params = {"w": rng.normal(size=(4, 3)).astype(np.float32),
            "b": rng.normal(size=3).astype(np.float32)}
  grads = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
           for _ in range(5)]
  tx, injected = make_optimizer(name)
  assert injected
  state, ours = with_learning_rate(tx.init(params), 0.01), dict(params)
  for g in grads:
    updates, state = tx.update(g, state, ours)
    ours = optax.apply_updates(ours, updates)
  keras = import_keras()
  variables = {k: keras.Variable(v) for k, v in params.items()}
  optimizer = keras_optimizer(keras)
  for g in grads:
    optimizer.apply_gradients([(g[k], variables[k]) for k in params])
  for k in params:
    np.testing.assert_allclose(ours[k], np.asarray(variables[k]), rtol=1e-5, atol=1e-6,
                               err_msg=f"{name}: {k}")


def test_batch_normalization_is_kerass_default_layer_in_training_and_after():
  """jaxlab's BatchNormalization layer and Keras's with its defaults (momentum 0.99, epsilon
  1e-3): the same output on a batch in training, the same moving statistics after it, and the
  same output in inference from them."""
  from jaxlab.models import FLAX_LAYERS, Op
  rng = np.random.default_rng(1)
  x = rng.normal(2, 3, (16, 5)).astype(np.float32)
  layer = import_keras().layers.BatchNormalization()
  keras_train = np.asarray(layer(x, training=True))
  keras_eval = np.asarray(layer(x, training=False))
  op, plan = Op("batch_normalization", "batch_normalization"), MLP()
  variables = FLAX_LAYERS[op.kind](op, plan, True).init(jax.random.PRNGKey(0), x)
  ours_train, updated = FLAX_LAYERS[op.kind](op, plan, True).apply(variables, x,
                                                                   mutable=["batch_stats"])
  stats = updated["batch_stats"]
  np.testing.assert_allclose(ours_train, keras_train, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(stats["mean"], np.asarray(layer.moving_mean), rtol=1e-6)
  np.testing.assert_allclose(stats["var"], np.asarray(layer.moving_variance), rtol=1e-6)
  ours_eval = FLAX_LAYERS[op.kind](op, plan, False).apply({**variables, "batch_stats": stats}, x)
  np.testing.assert_allclose(ours_eval, keras_eval, rtol=1e-5, atol=1e-5)


def last_batch_setup():
  """A small MLP (BatchNorm, no dropout) trained by SGD: a step's update is the learning rate
  times the mean gradient of its batch, so a batch averaged over the wrong count shows."""
  from jaxlab.models import fit
  from jaxlab.training.state import create_train_state, make_setup
  model = fit(MLP(layers=(Dense(16), Dense(8, batch_norm=False))), (28, 28, 1), 10)
  built = make_setup(model, (28, 28, 1), "sgd")
  return model, built, create_train_state(built, seed=0, learning_rate=0.1)


def test_the_loss_is_the_mean_cross_entropy_of_the_softmax():
  from jaxlab.training.steps import make_steps, to_inputs
  model, built, state = last_batch_setup()
  rng = np.random.default_rng(2)
  images = rng.integers(0, 256, (6, 28, 28, 1), dtype=np.uint8)
  labels = rng.integers(0, 10, 6).astype(np.uint8)
  logits, _ = model.apply(state.variables, to_inputs(images), train=True,
                          mutable=["batch_stats"])
  logits = np.asarray(logits, np.float64)
  exact = np.mean(np.log(np.exp(logits).sum(1)) - logits[np.arange(6), labels])
  _, sums = make_steps(built).train_step(state, images, labels)
  assert float(sums["loss"]) / 6 == pytest.approx(exact, rel=1e-6)
  keras = import_keras()
  assert float(keras.losses.SparseCategoricalCrossentropy(from_logits=True)(
      labels, logits)) == pytest.approx(exact, rel=1e-6)


def test_a_last_smaller_batch_steps_as_kerass_train_on_batch():
  """The 6 examples left at the end of an epoch of 70 at batch 32: jaxlab's step on them moves
  every weight and BatchNorm statistic as Keras's `train_on_batch` does from the same weights."""
  from jaxlab.keras.model import to_keras
  from jaxlab.keras.weights import keras_weights, set_keras_weights
  from jaxlab.training.steps import make_steps
  model, built, state = last_batch_setup()
  rng = np.random.default_rng(3)
  images = rng.integers(0, 256, (6, 28, 28, 1), dtype=np.uint8)
  labels = rng.integers(0, 10, 6).astype(np.uint8)
  keras = import_keras()
  net = to_keras(model)
  set_keras_weights(net, model, jax.tree_util.tree_map(np.asarray, state.variables))
  net.compile(optimizer=keras.optimizers.SGD(learning_rate=0.1),
              loss="sparse_categorical_crossentropy")
  net.train_on_batch(images.reshape(6, -1).astype(np.float32) / 255.0, labels.astype(np.int32))
  after, _ = make_steps(built).train_step(state, images, labels)
  for op in iter_ops(model.plan()):
    for ours, theirs in zip(keras_weights(op, jax.tree_util.tree_map(np.asarray,
                                                                     after.variables)),
                            net.get_layer(op.name).get_weights()):
      np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-6, err_msg=op.name)
