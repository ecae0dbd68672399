"""A lab of one's own: a residual CNN in Flax Linen and an MLP in Flax NNX, beside the Lab 02
baseline MLP, on a data set, a metric and an optimizer declared in this file alone.

README.md, section "Your own model", walks through this file block by block; the suite runs it.

  python scripts/run_lab.py --lab=experiments/example_lab.py --workdir=runs/example --seeds=0,1,2
"""

import numpy as np

from jaxlab.data import DATASETS, load_dataset, register_dataset


def fashion_mnist_14(data_dir=None):
  """Fashion-MNIST at 14 x 14: each 2 x 2 block of pixels averaged."""
  full = load_dataset("fashion_mnist", data_dir=data_dir)
  shrink = lambda x: x.reshape(-1, 14, 2, 14, 2).mean(axis=(2, 4)).round().astype(np.uint8)
  return (shrink(full.train_images), full.train_labels,
          shrink(full.test_images), full.test_labels)


register_dataset("fashion_mnist_14", image_shape=(14, 14, 1),
                 class_names=DATASETS.get("fashion_mnist").class_names, load=fashion_mnist_14)


from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp


class ResidualBlock(nn.Module):
  """Conv, BatchNorm, GELU, Conv, BatchNorm; added to its input (projected by a 1 x 1 conv where
  the width changes), then GELU."""

  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    norm = lambda y: nn.BatchNorm(use_running_average=not train, momentum=0.9,
                                  dtype=self.dtype)(y)
    y = nn.gelu(norm(nn.Conv(self.features, (3, 3), dtype=self.dtype)(x)))
    y = norm(nn.Conv(self.features, (3, 3), dtype=self.dtype)(y))
    if x.shape[-1] != self.features:
      x = nn.Conv(self.features, (1, 1), dtype=self.dtype)(x)
    return nn.gelu(x + y)


class SmallResNet(nn.Module):
  """Residual stages (each after the first halves the image), global average pooling, dropout,
  and a Dense classifier."""

  stages: Sequence[int] = (16, 32)
  dropout: float = 0.1
  num_classes: int = 10  # jaxlab sets it to the data set's classes.
  dtype: Any = jnp.float32  # --precision=bf16 sets it to bfloat16.

  @nn.compact
  def __call__(self, x, train: bool = False):
    for i, features in enumerate(self.stages):
      if i:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      x = ResidualBlock(features, dtype=self.dtype)(x, train)
    x = x.mean(axis=(1, 2))  # Global average pooling.
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.num_classes, dtype=self.dtype)(x)


from flax import nnx


class NNXMLP(nnx.Module):
  """LayerNorm over the pixels, a GELU hidden layer with dropout, and a linear classifier."""

  def __init__(self, in_features: int, num_classes: int = 10, hidden: int = 256,
               dropout: float = 0.2, *, rngs: nnx.Rngs):
    self.norm = nnx.LayerNorm(in_features, rngs=rngs)
    self.hidden = nnx.Linear(in_features, hidden, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.out = nnx.Linear(hidden, num_classes, rngs=rngs)

  def __call__(self, x, train: bool = False):
    x = self.norm(x.reshape((x.shape[0], -1)))
    return self.out(self.dropout(nnx.gelu(self.hidden(x)), deterministic=not train))


import jax
import optax


def top2_accuracy(logits, labels):
  """1 where the label is one of the two classes with the largest logits, else 0."""
  return jnp.any(jax.lax.top_k(logits, 2)[1] == labels[:, None], axis=-1)


def adamw_cosine(learning_rate):
  """AdamW whose learning rate warms up over the first epoch, then decays to 0 by a cosine."""
  epoch = 469  # Steps: 60,000 examples at batch 128.
  schedule = optax.join_schedules([optax.linear_schedule(0.0, learning_rate, epoch),
                                   optax.cosine_decay_schedule(learning_rate, 9 * epoch)],
                                  [epoch])
  return optax.inject_hyperparams(optax.adamw)(learning_rate=schedule, weight_decay=1e-4)


from jaxlab.experiment import Experiment, register
from jaxlab.models import MLP, Dense

OWN = dict(dataset="fashion_mnist_14", epochs=10, batch_size=128,
           metrics={"top2_accuracy": top2_accuracy})

register(Experiment(name="resnet_small", model=SmallResNet(), optimizer=adamw_cosine,
                    learning_rate=3e-3, **OWN))
register(Experiment(name="nnx_mlp", model=nnx.bridge.to_linen(NNXMLP, in_features=14 * 14),
                    optimizer=adamw_cosine, learning_rate=1e-3, **OWN))
# Lab 02's baseline (three Dense(128) + BatchNorm, Dropout 0.15), trained as the report did.
register(Experiment(name="mlp_baseline_14", model=MLP(layers=(
    Dense(128), Dense(128), Dense(128, dropout=0.15))), **OWN))


from jaxlab.report.findings import Compare, Question

QUESTIONS = [
    Question("Convolutions", "Does a small residual CNN beat the Lab 02 baseline MLP?",
             compare=(Compare("resnet_small", "mlp_baseline_14",
                              "residual CNN with AdamW and a cosine schedule"),)),
    Question("Top-2", "And on top-2 accuracy, where the MLP's second guesses count too?",
             compare=(Compare("resnet_small", "mlp_baseline_14",
                              "residual CNN with AdamW and a cosine schedule"),),
             on="top2_accuracy"),
    Question("One wide layer", "Does one GELU layer of 256 with LayerNorm match three of 128?",
             compare=(Compare("nnx_mlp", "mlp_baseline_14",
                              "NNX: LayerNorm, one GELU layer of 256, AdamW"),)),
]
