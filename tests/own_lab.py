"""A user's lab file for the tests: tiny models (Linen, and NNX through the bridge), a data set,
a metric and optimizers of its own, declared here alone (nothing in jaxlab/ knows them)."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxlab.data import register_dataset
from jaxlab.experiment import Experiment, register
from jaxlab.report.findings import Compare, Question

CLASSES = ("top", "upper", "lower", "bottom")


def tiny_blocks(seed=0, n_train=96, n_test=48):
  """8 x 8 images: class c lights rows 2c and 2c + 1; int64 labels (the loader converts them)."""
  rng = np.random.default_rng(seed)

  def split(n):
    labels = rng.integers(0, len(CLASSES), n)
    images = rng.integers(0, 60, (n, 8, 8)).astype(np.uint8)
    for i, c in enumerate(labels):
      images[i, 2 * c:2 * c + 2, :] = 255
    return images, labels

  return (*split(n_train), *split(n_test))


register_dataset("tiny_blocks", image_shape=(8, 8, 1), class_names=CLASSES, load=tiny_blocks)


class TinyRes(nn.Module):
  """A conv stem, a GELU conv with LayerNorm added back to it (a skip), global average pooling,
  dropout, a Dense head: a residual CNN of the user's kind."""

  num_classes: int = 10
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(4, (3, 3), dtype=self.dtype, name="stem")(x)
    y = nn.LayerNorm(dtype=self.dtype, name="norm")(
        nn.gelu(nn.Conv(4, (3, 3), dtype=self.dtype, name="conv")(x)))
    x = nn.Dropout(0.2, deterministic=not train)((x + y).mean(axis=(1, 2)))
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)


class TinyNNX(nnx.Module):
  """Linear, BatchNorm, ReLU, Dropout, Linear, in Flax NNX (no dtype: bf16 is refused)."""

  def __init__(self, num_classes: int = 10, *, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(64, 16, rngs=rngs)
    self.bn = nnx.BatchNorm(16, rngs=rngs)
    self.drop = nnx.Dropout(0.3, rngs=rngs)
    self.out = nnx.Linear(16, num_classes, rngs=rngs)

  def __call__(self, x, train: bool = False):
    x = self.bn(self.hidden(x.reshape((x.shape[0], -1))), use_running_average=not train)
    return self.out(self.drop(nnx.relu(x), deterministic=not train))


def top2_accuracy(logits, labels):
  return jnp.any(jax.lax.top_k(logits, 2)[1] == labels[:, None], axis=-1)


def sgd_cosine(learning_rate):
  """SGD with momentum whose learning rate decays by a cosine over 12 steps (then 0)."""
  return optax.inject_hyperparams(optax.sgd)(
      learning_rate=optax.cosine_decay_schedule(learning_rate, 12), momentum=0.9)


def sgd_warmup_cosine(learning_rate):
  """SGD under optax's warmup-cosine schedule, injected by the function itself: it cannot take
  a traced learning rate (the schedule branches on its peak value)."""
  return optax.inject_hyperparams(optax.sgd)(
      learning_rate=optax.warmup_cosine_decay_schedule(0.0, learning_rate, 2, 12))


OWN = dict(dataset="tiny_blocks", epochs=3, batch_size=16,
           metrics={"top2_accuracy": top2_accuracy})
register(Experiment(name="own_linen", model=TinyRes(), optimizer=sgd_cosine, learning_rate=0.1,
                    **OWN))
register(Experiment(name="own_nnx", model=nnx.bridge.to_linen(TinyNNX, num_classes=10),
                    learning_rate=1e-2, **OWN))
register(Experiment(name="own_fixed", model=TinyRes(), optimizer=sgd_warmup_cosine,
                    learning_rate=0.05,
                    **OWN))

QUESTIONS = [Question("Linen or NNX", "Does the residual CNN beat the NNX MLP on top-2?",
                      compare=(Compare("own_linen", "own_nnx", "residual CNN, not an MLP"),),
                      on="top2_accuracy")]
