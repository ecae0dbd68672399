"""The conv family: conv and pooling against float64 NumPy, every CNN experiment's step, L2,
mixed precision, and a small CNN that overfits."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.experiment import (EXPERIMENTS, Experiment, build_model, experiment_names, register,
                               resolve_config)
from jaxlab.files import read_jsonl
from jaxlab.models import (Conv, ConvBlock, ConvNet, Dense, MaxPool, at_precision,
                           l2_penalty, mixed_matmul, op_precisions)
from jaxlab.training.state import create_train_state, init_program, make_setup
from jaxlab.training.steps import make_steps, make_train_step
from jaxlab.training.train import train_and_evaluate
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


if "cnn_small_l2" not in EXPERIMENTS:  # alexnet_l2's L2 placement on a small conv net.
  register(Experiment(
      name="cnn_small_l2", dataset="fashion_mnist", epochs=1, batch_size=8,
      model=ConvNet(blocks=(ConvBlock((Conv(4, 5, l2=0.01),), MaxPool(3, 1), True, 0.1),
                            ConvBlock((Conv(8, 3, padding="same", l2=0.01),), MaxPool(2))),
                    head=(Dense(16, "relu", batch_norm=False, dropout=0.5, l2=0.01),))))


def test_l2_term_in_the_logged_loss(tmp_path):
  """The logged L2 term is c * sum(w**2) over the regularized kernels, by hand."""
  config = resolve_config("cnn_small_l2", dataset="fashion_mnist", epochs=1, batch_size=8,
                          train_limit=8, eval_batch_size=8)
  model = build_model("cnn_small_l2", "fashion_mnist")
  state = create_train_state(make_setup(model, (28, 28, 1)), seed=0, learning_rate=1e-3)
  names = ("conv2d", "conv2d_1", "dense")
  kernels = [np.asarray(state.params[name]["kernel"], np.float64) for name in names]
  by_hand = sum(0.01 * np.sum(k ** 2) for k in kernels)
  assert model.l2_coefficients() == {name: 0.01 for name in names}
  assert float(l2_penalty(state.params, dict.fromkeys(names, 0.01))) == pytest.approx(
      by_hand, rel=1e-5)
  # One step of training logs the L2 term of the parameters it started from.
  ds = synthetic_dataset("fashion_mnist", n_train=8, n_test=8)
  train_and_evaluate(config, tmp_path, dataset=ds)
  record = read_jsonl(tmp_path / "metrics.jsonl")[0]
  assert record["train_l2_loss"] == pytest.approx(by_hand, rel=1e-4)
  assert record["train_loss"] == pytest.approx(record["train_data_loss"] + by_hand, rel=1e-4)


def narrow(model, by=16):
  """The architecture with every layer `by` times narrower (at least 2 features): the same
  layers, kernel sizes, strides, pooling and so the same spatial shapes, a fraction of the work."""
  shrink = lambda n: max(2, n // by)
  return model.clone(
      blocks=tuple(dataclasses.replace(b, convs=tuple(dataclasses.replace(c, features=shrink(
          c.features)) for c in b.convs)) for b in model.blocks),
      head=tuple(dataclasses.replace(d, features=shrink(d.features)) for d in model.head))


@pytest.mark.slow
@pytest.mark.parametrize("name", CNN_EXPERIMENTS)
def test_one_train_step_of_every_cnn_experiment(name):
  """At full size the train step is traced (`jax.eval_shape`: its shapes and types, without
  compiling it or holding a state of up to a gigabyte); at a sixteenth of the width it runs."""
  model = build_model(name)
  built = make_setup(model, model.input_shape())
  state = init_program(built).eval_shape(jax.ShapeDtypeStruct((), jnp.int32),
                                         jax.ShapeDtypeStruct((), jnp.float32))
  batch = (jax.ShapeDtypeStruct((2,) + model.input_shape(), jnp.uint8),
           jax.ShapeDtypeStruct((2,), jnp.uint8))
  after, metrics = jax.eval_shape(make_train_step(built), state, *batch)
  shapes = lambda tree: jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), tree)
  assert shapes(after) == shapes(state)  # The step keeps every array of the state as it is.
  assert {k: v.shape for k, v in metrics.items()} == dict.fromkeys(metrics, ())
  small = narrow(model)
  assert [op.kind for op in small.plan()] == [op.kind for op in model.plan()]
  ds = synthetic_dataset("cifar10" if model.input_shape() == (32, 32, 3) else "fashion_mnist",
                         n_train=2, n_test=2)
  small_setup = make_setup(small, small.input_shape())
  state = create_train_state(small_setup, seed=0, learning_rate=1e-3)
  before = np.asarray(state.params["dense"]["kernel"])
  state, metrics = make_steps(small_setup).train_step(state, jnp.asarray(ds.train_images),
                                                      jnp.asarray(ds.train_labels))
  loss = float(metrics["loss"]) / 2
  assert np.isfinite(loss) and loss > 0
  assert int(state.step) == 1
  assert not np.array_equal(np.asarray(state.params["dense"]["kernel"]), before)


SMALL_CNN = ConvNet(blocks=(ConvBlock((Conv(8, 3, padding="same"),), MaxPool(2), True),
                            ConvBlock((Conv(16, 3),), MaxPool(2, 1), True)),
                    head=(Dense(32, "relu", batch_norm=False),), image_shape=(28, 28, 1))


def overfit(model, steps=80):
  """Full-batch training on 64 images with random labels: only memorizing can fit them."""
  ds = synthetic_dataset("fashion_mnist", n_train=64, seed=3)
  labels = jnp.asarray(np.random.default_rng(0).integers(0, 10, 64).astype(np.uint8))
  images = jnp.asarray(ds.train_images)
  built = make_setup(model, (28, 28, 1))
  state = create_train_state(built, seed=0, learning_rate=3e-3)
  step = make_steps(built).train_step
  for _ in range(steps):
    state, metrics = step(state, images, labels)
  return state, float(metrics["loss"]) / 64, int(metrics["accuracy"]) / 64


@pytest.mark.slow
def test_small_cnn_overfits_64_examples():
  _, loss, accuracy = overfit(SMALL_CNN)
  assert accuracy == 1.0 and loss < 0.05


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_bf16_trains_and_keeps_float32_state(backend):
  """bf16 as each backend computes it (`jaxlab.models.at_precision`; a GPU's path built and run
  here on the CPU): the small CNN still memorizes its 64 examples, the state stays float32, and
  the logits agree with float32's to bfloat16's precision."""
  model = at_precision(SMALL_CNN, "bf16", backend=backend)
  state, loss, accuracy = overfit(model)
  assert accuracy == 1.0 and loss < 0.1
  for leaf in jax.tree_util.tree_leaves((state.params, state.opt_state, state.batch_stats)):
    assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype
  x = jnp.asarray(np.random.default_rng(1).random((4, 28, 28, 1)), jnp.float32)
  _, captured = model.apply(state.variables, x, capture_intermediates=True,
                            mutable=["intermediates"])
  layers = {k: v["__call__"][-1].dtype for k, v in captured["intermediates"].items()
            if k != "__call__"}
  if backend == "gpu":  # bfloat16 layers.
    assert layers["conv2d"] == layers["dense"] == jnp.bfloat16
  else:  # Dots written in float32, convolutions in float32.
    assert layers["conv2d"] == layers["dense"] == jnp.float32
  logits = model.apply(state.variables, x)
  logits_f32 = SMALL_CNN.apply(state.variables, x)
  assert logits.dtype == jnp.float32  # The loss is computed in float32.
  # bfloat16 keeps 8 bits of mantissa: agreement to a few percent of the logits' scale.
  scale = float(jnp.abs(logits_f32).max())
  np.testing.assert_allclose(logits, logits_f32, atol=0.05 * scale)


def test_bf16_precision_flag_builds_the_backends_bf16_model():
  cpu = build_model("alexnet", precision="bf16")  # This suite runs on the CPU.
  assert (cpu.dtype, cpu.mixed_dots) == (jnp.float32, True)
  assert op_precisions(cpu) == {"dense": "bf16", "conv2d": "float32"}
  gpu = at_precision(build_model("alexnet"), "bf16", backend="gpu")
  assert (gpu.dtype, gpu.mixed_dots) == (jnp.bfloat16, False)
  assert op_precisions(gpu) == {"dense": "bf16", "conv2d": "bf16"}
  assert (build_model("alexnet").dtype, build_model("alexnet").mixed_dots) == (jnp.float32, False)


def test_mixed_dots_read_bfloat16_and_write_float32_forward_and_backward():
  """`mixed_matmul` against float64 on the same bfloat16-rounded operands (exact up to float32
  accumulation), for the output and both gradients; and in the compiled gradient every dot
  reads bfloat16 operands and writes float32 (JAX's own transpose would read float32)."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(3, 8, 64)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(64, 32)), jnp.float32)
  g = jnp.asarray(rng.normal(size=(3, 8, 32)), jnp.float32)
  rounded = lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16), np.float64)
  y, vjp = jax.vjp(mixed_matmul, x, w)
  dx, dw = vjp(g)
  assert y.dtype == dx.dtype == dw.dtype == jnp.float32
  xr, wr, gr = rounded(x), rounded(w), rounded(g)
  np.testing.assert_allclose(y, xr @ wr, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, gr @ wr.T, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, xr.reshape(-1, 64).T @ gr.reshape(-1, 32), rtol=1e-5, atol=1e-5)
  # float32 would differ from these by bfloat16's rounding: the test tells the two apart.
  assert np.abs(np.asarray(x, np.float64) @ np.asarray(w, np.float64) - xr @ wr).max() > 1e-3
  jaxpr = jax.make_jaxpr(jax.grad(lambda x, w: jnp.sum(mixed_matmul(x, w) ** 2), (0, 1)))(x, w)
  dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
  assert len(dots) == 3  # Forward, and the two of the gradient.
  for dot in dots:
    assert [v.aval.dtype for v in dot.invars] == [jnp.bfloat16, jnp.bfloat16]
    assert dot.outvars[0].aval.dtype == jnp.float32
