"""The conv family: conv and pooling against float64 NumPy, every CNN experiment's step, L2,
mixed precision, and a small CNN that overfits."""

import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxlab.experiment import build_model, resolve_config
from jaxlab.data import load_dataset
from jaxlab.experiment import experiment_names
from jaxlab.metrics import read_jsonl
from jaxlab.models import Conv, ConvBlock, ConvNet, Dense, MaxPool
from jaxlab.optim import make_optimizer
from jaxlab.state import create_train_state
from jaxlab.steps import l2_penalty, make_steps
from jaxlab.train import train_and_evaluate
from datafiles import synthetic_dataset

CNN_EXPERIMENTS = [n for n in experiment_names() if not n.startswith("mlp_")]


def conv2d_reference(x, kernel, bias, stride, padding):
  """Keras Conv2D in float64: NHWC input, HWIO kernel, TF-style 'same' padding."""
  n, h, w, c = x.shape
  k = kernel.shape[0]
  if padding == "same":
    out_h, out_w = -(-h // stride), -(-w // stride)
    pad_h = max((out_h - 1) * stride + k - h, 0)
    pad_w = max((out_w - 1) * stride + k - w, 0)
    x = np.pad(x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2),
                   (0, 0)))
  else:
    out_h, out_w = (h - k) // stride + 1, (w - k) // stride + 1
  out = np.zeros((n, out_h, out_w, kernel.shape[-1]))
  for i in range(out_h):
    for j in range(out_w):
      patch = x[:, i * stride:i * stride + k, j * stride:j * stride + k, :]
      out[:, i, j, :] = np.tensordot(patch, kernel, axes=([1, 2, 3], [0, 1, 2]))
  return out + bias


def maxpool_reference(x, pool, stride):
  n, h, w, c = x.shape
  out_h, out_w = (h - pool) // stride + 1, (w - pool) // stride + 1  # 'valid': floor.
  out = np.empty((n, out_h, out_w, c))
  for i in range(out_h):
    for j in range(out_w):
      out[:, i, j, :] = x[:, i * stride:i * stride + pool, j * stride:j * stride + pool].max((1, 2))
  return out


def captured(model, x, variables):
  _, state = model.apply(variables, jnp.asarray(x, jnp.float32), train=False,
                         capture_intermediates=True, mutable=["intermediates"])
  return {k: np.asarray(v["__call__"][-1], np.float64)
          for k, v in state["intermediates"].items() if k != "__call__"}


@pytest.mark.parametrize("padding", ["valid", "same"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size,kernel", [(9, 3), (10, 5)])
def test_conv_and_pool_match_float64_reference(padding, stride, size, kernel):
  model = ConvNet(blocks=(ConvBlock((Conv(5, kernel, strides=stride, padding=padding),),
                                    MaxPool(2, stride)),), image_shape=(size, size, 3))
  rng = np.random.default_rng(stride * 10 + kernel)
  x = rng.normal(size=(2, size, size, 3))
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))
  variables = jax.tree_util.tree_map(lambda a: jnp.asarray(rng.normal(size=a.shape), jnp.float32),
                                     variables)
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), variables["params"])
  layers = captured(model, x, variables)
  conv = np.maximum(conv2d_reference(x, p["conv2d"]["kernel"], p["conv2d"]["bias"], stride,
                                     padding), 0)
  scale = np.abs(conv).max()
  np.testing.assert_allclose(layers["conv2d"], conv, rtol=1e-5, atol=1e-5 * scale)
  pooled = maxpool_reference(conv, 2, stride)
  np.testing.assert_allclose(layers["max_pooling2d"], pooled, rtol=1e-5, atol=1e-5 * scale)
  np.testing.assert_allclose(layers["flatten"], pooled.reshape(2, -1), rtol=1e-5,
                             atol=1e-5 * scale)


@pytest.mark.slow
def test_l2_term_in_the_logged_loss(tmp_path):
  """The logged L2 term is c * sum(w**2) over the regularized kernels, by hand."""
  config = resolve_config("alexnet_l2", dataset="fashion_mnist", epochs=1, batch_size=8,
                          train_limit=8, eval_batch_size=8)
  model = build_model("alexnet_l2", "fashion_mnist")
  state = create_train_state(model, make_optimizer("adam"), seed=0, learning_rate=1e-3)
  kernels = [np.asarray(state.params[name]["kernel"], np.float64)
             for name in ("conv2d", "conv2d_1", "conv2d_2", "conv2d_3", "conv2d_4", "dense",
                          "dense_1")]
  by_hand = sum(0.01 * np.sum(k ** 2) for k in kernels)
  assert float(l2_penalty(state.params, {"conv2d": 0.01, "conv2d_1": 0.01, "conv2d_2": 0.01,
                                         "conv2d_3": 0.01, "conv2d_4": 0.01, "dense": 0.01,
                                         "dense_1": 0.01})) == pytest.approx(by_hand, rel=1e-5)
  # One step of training logs the L2 term of the parameters it started from.
  ds = synthetic_dataset("fashion_mnist", n_train=8, n_test=8)
  train_and_evaluate(config, tmp_path, dataset=ds)
  record = read_jsonl(tmp_path / "metrics.jsonl")[0]
  assert record["train_l2_loss"] == pytest.approx(by_hand, rel=1e-4)
  assert record["train_loss"] == pytest.approx(record["train_data_loss"] + by_hand, rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", CNN_EXPERIMENTS)
def test_one_train_step_of_every_cnn_experiment(name):
  dataset_name = build_model(name).input_shape() == (32, 32, 3) and "cifar10" or "fashion_mnist"
  tfds_dir = pathlib.Path(os.environ["TFDS_DATA_DIR"])  # The tests' own, empty but for this:
  (tfds_dir / dataset_name).mkdir(parents=True, exist_ok=True)
  with tfds.testing.mock_data(num_examples=4):
    ds = load_dataset(dataset_name, use_cache=False, debian_dir=pathlib.Path("/nonexistent"))
  model = build_model(name, dataset_name)
  state = create_train_state(model, make_optimizer("adam"), seed=0, learning_rate=1e-3)
  before = np.asarray(state.params["dense"]["kernel"][:4, :4])
  state, metrics = make_steps(model).train_step(state, jnp.asarray(ds.train_images[:2]),
                                                jnp.asarray(ds.train_labels[:2]))
  loss = float(metrics["loss_sum"]) / 2
  assert np.isfinite(loss) and loss > 0
  assert int(state.step) == 1
  assert not np.array_equal(np.asarray(state.params["dense"]["kernel"][:4, :4]), before)


SMALL_CNN = ConvNet(blocks=(ConvBlock((Conv(8, 3, padding="same"),), MaxPool(2), True),
                            ConvBlock((Conv(16, 3),), MaxPool(2, 1), True)),
                    head=(Dense(32, "relu", batch_norm=False),), image_shape=(28, 28, 1))


def overfit(model, steps=80):
  """Full-batch training on 64 images with random labels: only memorizing can fit them."""
  ds = synthetic_dataset("fashion_mnist", n_train=64, seed=3)
  labels = jnp.asarray(np.random.default_rng(0).integers(0, 10, 64).astype(np.uint8))
  images = jnp.asarray(ds.train_images)
  state = create_train_state(model, make_optimizer("adam"), seed=0, learning_rate=3e-3)
  step = make_steps(model).train_step
  for _ in range(steps):
    state, metrics = step(state, images, labels)
  return state, float(metrics["loss_sum"]) / 64, int(metrics["correct"]) / 64


@pytest.mark.slow
def test_small_cnn_overfits_64_examples():
  _, loss, accuracy = overfit(SMALL_CNN)
  assert accuracy == 1.0 and loss < 0.05


@pytest.mark.slow
def test_bf16_computes_in_bfloat16_and_keeps_float32_state():
  model = SMALL_CNN.clone(dtype=jnp.bfloat16)
  state, loss, accuracy = overfit(model)
  assert accuracy == 1.0 and loss < 0.1
  for leaf in jax.tree_util.tree_leaves((state.params, state.opt_state, state.batch_stats)):
    assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype
  x = jnp.asarray(np.random.default_rng(1).random((4, 28, 28, 1)), jnp.float32)
  _, captured_bf16 = model.apply(state.variables, x, capture_intermediates=True,
                                 mutable=["intermediates"])
  assert captured_bf16["intermediates"]["conv2d"]["__call__"][-1].dtype == jnp.bfloat16
  logits_bf16 = model.apply(state.variables, x)
  logits_f32 = SMALL_CNN.apply(state.variables, x)
  assert logits_bf16.dtype == jnp.float32  # The loss is computed in float32.
  # bfloat16 keeps 8 bits of mantissa: agreement to a few percent of the logits' scale.
  scale = float(jnp.abs(logits_f32).max())
  np.testing.assert_allclose(logits_bf16, logits_f32, atol=0.05 * scale)


def test_bf16_precision_flag_builds_a_bfloat16_model():
  assert build_model("alexnet", precision="bf16").dtype == jnp.bfloat16
  assert build_model("alexnet").dtype == jnp.float32
