"""The two loops of a chunk (one `lax.scan`, or one dispatch of the step each) compute the same
steps, evaluation included; "auto" picks per model and backend; a resumed run keeps its loop."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.experiment import (EXPERIMENTS, Experiment, build_model, register, resolve_config)
from jaxlab.models import Conv, ConvBlock, ConvNet, Dense, MaxPool
from jaxlab.metrics import NO_STEP
from jaxlab.training.state import create_group_state, make_setup
from jaxlab.training.steps import choose_loop, evaluate_group, make_steps, train_epoch
from jaxlab.training.train import train_and_evaluate
from datafiles import random_dataset
from runstate import arrays, biases_before_batch_norm, largest_difference
from conftest import SMALL

if "loop_small_cnn" not in EXPERIMENTS:
  register(Experiment(
      name="loop_small_cnn", dataset="fashion_mnist", epochs=1, batch_size=16,
      model=ConvNet(blocks=(ConvBlock((Conv(4, 3, padding="same"),), MaxPool(2), True, 0.25),),
                    head=(Dense(16, "relu", batch_norm=True, dropout=0.5),))))


@pytest.mark.slow
@pytest.mark.parametrize("name,dataset", [("mlp_dropout", "mnist"),
                                          ("loop_small_cnn", "fashion_mnist")])
def test_both_loops_train_and_evaluate_the_same(name, dataset):
  """Two members, BatchNorm and Dropout, 70 examples at batch 16 in chunks of 2 (chunks of 2,
  2 and a last smaller batch): the same states and sums up to float rounding (SGD: Adam turns
  rounding in the zero gradients of the biases before BatchNorm into full steps), the same
  predictions."""
  ds = random_dataset(dataset, n_train=70, n_test=40)
  model = build_model(name, dataset)
  images, labels = jax.device_put(ds.train_images), jax.device_put(ds.train_labels)
  results = {}
  for loop in ("scan", "steps"):
    built = make_setup(model, ds.info.image_shape, "sgd")
    steps = make_steps(built, "stop", None, loop)
    assert steps.loop == loop
    state = create_group_state(built, [0, 1], [0.05, 0.05])
    chunks = []
    state, metrics = train_epoch(steps, state, images, labels, 16,
                                 jnp.stack([jax.random.PRNGKey(3), jax.random.PRNGKey(4)]), 2,
                                 on_chunk=lambda n, totals: chunks.append(n))
    val, preds = evaluate_group(steps, state.variables, jax.device_put(ds.test_images),
                                jax.device_put(ds.test_labels), 16)
    results[loop] = arrays(state), metrics, val, preds, chunks
    # A chunk's raw sums of finite steps: the first bad step is none (NO_STEP), not step 0.
    batches = jnp.arange(64).reshape(2, 2, 16)
    _, sums = steps.train_chunk(state, images, labels, batches, 0, length=2)
    assert jax.device_get(sums["first_nonfinite"]).tolist() == [NO_STEP, NO_STEP], loop
    assert jax.device_get(sums["count"]).tolist() == [32, 32], loop
  (a, ma, va, pa, ca), (b, mb, vb, pb, cb) = results["scan"], results["steps"]
  assert ca == cb == [2, 2, 1]  # The same chunks reach the host.
  assert int(a["step"][0]) == int(b["step"][0]) == 5
  # The CNN's convolutions sum in another order inside a while loop: 5e-5 after 5 steps, at
  # most, on an AMD EPYC; a step computed wrongly (another batch, no dropout) is off by 1e-2.
  skip = biases_before_batch_norm(model.describe_plan()["layers"])
  assert largest_difference(b, a, skip=skip) < 2e-4
  for x, y in zip(ma + va, mb + vb):
    assert x.keys() == y.keys()
    for key in x:
      assert y[key] == pytest.approx(x[key], rel=1e-5), key
  np.testing.assert_array_equal(pa, pb)


def test_auto_picks_steps_for_convolutions_on_the_cpu():
  cnn, mlp = (make_setup(build_model(name), (28, 28, 1)) for name in ("alexnet", "mlp_baseline"))
  assert choose_loop(cnn, backend="cpu") == choose_loop(cnn, "auto", backend="cpu") == "steps"
  assert choose_loop(mlp, backend="cpu") == "scan"
  assert choose_loop(cnn, backend="gpu") == "scan"
  assert choose_loop(cnn, "scan", backend="cpu") == "scan"
  assert choose_loop(mlp, "steps", backend="gpu") == "steps"
  with pytest.raises(ValueError, match="unknown loop 'while'; known: auto, scan, steps"):
    choose_loop(mlp, "while")


@pytest.mark.slow
def test_a_resumed_run_keeps_the_loop_it_started_with(tmp_path):
  ds = random_dataset(n_train=64, n_test=32)
  config = resolve_config("mlp_baseline", **{**SMALL, "epochs": 1})
  train_and_evaluate(config, tmp_path, dataset=ds, loop="steps")
  environment = lambda: json.loads((tmp_path / "config.json").read_text())["environment"]
  assert environment()["loop"] == "steps"
  # Not given ("auto" would pick "scan" for an MLP): the loop the run started with.
  train_and_evaluate(config.replace(epochs=2), tmp_path, dataset=ds)
  assert environment()["loop"] == "steps"
  train_and_evaluate(config.replace(epochs=3), tmp_path, dataset=ds, restart=True)
  assert environment()["loop"] == "scan"
