"""Each layer kind against a float64 NumPy reference, and the plans' Keras naming."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.models import (MLP, BN_EPSILON, BN_MOMENTUM, Conv, ConvBlock, ConvNet, Dense,
                           Parallel, iter_ops)

jax.config.update("jax_enable_x64", False)
RTOL = 1e-5  # float32 arithmetic against a float64 reference.


def run(model, x, variables=None, train=False, rng=0):
  if variables is None:
    variables = model.init(jax.random.PRNGKey(1), jnp.asarray(x, jnp.float32))
  out, state = model.apply(variables, jnp.asarray(x, jnp.float32), train=train,
                           rngs={"dropout": jax.random.PRNGKey(rng)},
                           mutable=["batch_stats", "intermediates"], capture_intermediates=True)
  layers = {k: np.asarray(v["__call__"][-1], np.float64)
            for k, v in state["intermediates"].items() if k != "__call__"}
  return variables, np.asarray(out, np.float64), layers, state.get("batch_stats", {})


def f64(tree):
  return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)


def test_dense_relu_and_glorot_init():
  model = MLP(layers=(Dense(300, batch_norm=False),), num_inputs=200)
  x = np.random.default_rng(0).normal(size=(8, 200))
  variables, out, layers, _ = run(model, x)
  p = f64(variables["params"])
  ref = np.maximum(x @ p["dense"]["kernel"] + p["dense"]["bias"], 0)
  np.testing.assert_allclose(layers["dense"], ref, rtol=RTOL, atol=1e-5)
  np.testing.assert_allclose(out, ref @ p["dense_1"]["kernel"] + p["dense_1"]["bias"],
                             rtol=RTOL, atol=1e-5)
  # Glorot uniform: U(-l, l) with l = sqrt(6 / (fan_in + fan_out)); zero biases.
  limit = np.sqrt(6 / (200 + 300))
  kernel = p["dense"]["kernel"]
  assert np.abs(kernel).max() <= limit and np.abs(kernel).max() > 0.95 * limit
  assert abs(kernel.std() - limit / np.sqrt(3)) < 0.02 * limit
  assert not p["dense"]["bias"].any()


def test_batch_norm_train_and_eval_against_keras_formulas():
  model = MLP(layers=(Dense(16, activation=None, batch_norm=True),), num_inputs=5)
  rng = np.random.default_rng(1)
  x = rng.normal(3.0, 2.0, size=(32, 5))
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 5)))
  variables = jax.tree_util.tree_map(
      lambda a: jnp.asarray(rng.normal(0.5, 0.3, a.shape), jnp.float32), variables)
  _, _, layers, new_stats = run(model, x, variables, train=True)
  p, s = f64(variables["params"]), f64(variables["batch_stats"])
  h = x @ p["dense"]["kernel"] + p["dense"]["bias"]
  mean, var = h.mean(0), h.var(0)  # Biased variance, as Keras uses.
  bn = p["batch_normalization"]
  ref = (h - mean) / np.sqrt(var + BN_EPSILON) * bn["scale"] + bn["bias"]
  np.testing.assert_allclose(layers["batch_normalization"], ref, rtol=1e-4, atol=1e-4)
  new = f64(new_stats)["batch_normalization"]
  old = s["batch_normalization"]
  np.testing.assert_allclose(new["mean"], BN_MOMENTUM * old["mean"] + (1 - BN_MOMENTUM) * mean,
                             rtol=RTOL)
  np.testing.assert_allclose(new["var"], BN_MOMENTUM * old["var"] + (1 - BN_MOMENTUM) * var,
                             rtol=1e-4)
  # Eval mode normalizes with the moving statistics.
  _, _, layers, _ = run(model, x, variables, train=False)
  ref = ((h - old["mean"]) / np.sqrt(np.abs(old["var"]) + BN_EPSILON) * bn["scale"] + bn["bias"])
  mask = old["var"] > 0
  np.testing.assert_allclose(layers["batch_normalization"][:, mask], ref[:, mask], rtol=1e-4,
                             atol=1e-4)


def test_dropout_is_inverted_and_only_in_training():
  model = MLP(layers=(Dense(4000, activation=None, batch_norm=False, dropout=0.25),),
              num_inputs=3)
  x = np.ones((2, 3))
  variables, _, layers, _ = run(model, x, train=True)
  dense, dropped = layers["dense"], layers["dropout"]
  kept = dropped != 0
  assert 0.7 < kept.mean() < 0.8  # About 1 - rate kept.
  np.testing.assert_allclose(dropped[kept], dense[kept] / 0.75, rtol=RTOL)
  _, _, layers, _ = run(model, x, variables, train=False)
  np.testing.assert_array_equal(layers["dropout"], layers["dense"])


def test_parallel_paths_concatenate_in_order():
  model = MLP(layers=(Parallel(paths=((Dense(3, batch_norm=False),),
                                      (Dense(2, batch_norm=False), Dense(4, batch_norm=False)))),),
              num_inputs=6)
  x = np.random.default_rng(2).normal(size=(5, 6))
  variables, _, layers, _ = run(model, x)
  p = f64(variables["params"])
  relu = lambda v: np.maximum(v, 0)
  a = relu(x @ p["dense"]["kernel"] + p["dense"]["bias"])
  b = relu(relu(x @ p["dense_1"]["kernel"] + p["dense_1"]["bias"]) @ p["dense_2"]["kernel"]
           + p["dense_2"]["bias"])
  np.testing.assert_allclose(layers["concatenate"], np.concatenate([a, b], 1), rtol=RTOL,
                             atol=1e-6)


def test_plan_names_follow_keras():
  model = MLP(layers=(Parallel(paths=((Dense(64), Dense(128)), (Dense(32), Dense(64)))),
                      Dense(256)))
  names = [op.name for op in iter_ops(model.plan())]
  assert names == ["dense", "batch_normalization", "dense_1", "batch_normalization_1",
                   "dense_2", "batch_normalization_2", "dense_3", "batch_normalization_3",
                   "concatenate", "dense_4", "batch_normalization_4", "dense_5"]


def test_bad_specs_are_named():
  with pytest.raises(ValueError, match="dropout rate must be in \\[0, 1\\), got 1.5"):
    MLP(layers=(Dense(4, dropout=1.5),)).plan()
  with pytest.raises(ValueError, match="unknown activation 'gelu2'"):
    MLP(layers=(Dense(4, activation="gelu2"),)).plan()
  with pytest.raises(ValueError, match="padding must be 'valid' or 'same', got 'full'"):
    ConvNet(blocks=(ConvBlock((Conv(4, 3, padding="full"),)),)).plan()


def test_l2_coefficients_come_from_the_specs():
  model = ConvNet(blocks=(ConvBlock((Conv(4, 3, l2=0.01), Conv(4, 3))),),
                  head=(Dense(8, l2=0.02, batch_norm=False),))
  assert model.l2_coefficients() == {"conv2d": 0.01, "dense": 0.02}
