"""Keras 3 models of jaxlab plans, and their layers' outputs under jaxlab's layer names.

`to_keras` builds the Keras model of a plan (the same layers, names and settings); `keras_order`
lists the plan's ops in the order Keras lists that model's layers, which is also the order of a
Keras weights file; `keras_capture` runs a Keras model and returns every layer's output as
`jaxlab.inspection.compare.capture` returns jaxlab's. Keras is an optional dependency (the `keras` and
`test` extras), imported when these run, on the JAX backend unless KERAS_BACKEND says otherwise.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import flax.linen as nn
import numpy as np

from jaxlab.errors import BadValue, MissingDependency
from jaxlab.models import BN_EPSILON, BN_MOMENTUM, Op, plan_of, walk


def import_keras():
  os.environ.setdefault("KERAS_BACKEND", "jax")
  try:
    import keras
  except ImportError:
    raise MissingDependency("Keras is needed for this; install it with "
                            "`pip install -e '.[keras]'`") from None
  return keras


@dataclasses.dataclass(frozen=True)
class KerasLayer:
  """A kind of op as Keras builds it (`build(keras, op, activation)`), and its variables in the
  order Keras's `layer.get_weights()` lists them: (collection, name) of jaxlab's."""

  build: Callable[..., Any]
  variables: tuple[tuple[str, str], ...] = ()


_KERNEL_BIAS = (("params", "kernel"), ("params", "bias"))

# Op kind -> its Keras layer (`keras`, the op, its activation: a softmax for the output layer).
KERAS_LAYERS: dict[str, KerasLayer] = {
    "dense": KerasLayer(lambda keras, op, activation: keras.layers.Dense(
        op.features, activation=activation, name=op.name, **_l2(keras, op)), _KERNEL_BIAS),
    "conv2d": KerasLayer(lambda keras, op, activation: keras.layers.Conv2D(
        op.features, op.kernel_size, strides=op.strides, padding=op.padding,
        activation=activation, name=op.name, **_l2(keras, op)), _KERNEL_BIAS),
    "batch_normalization": KerasLayer(lambda keras, op, activation:
                                      keras.layers.BatchNormalization(
                                          momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=op.name),
                                      (("params", "scale"), ("params", "bias"),
                                       ("batch_stats", "mean"), ("batch_stats", "var"))),
    "dropout": KerasLayer(lambda keras, op, activation: keras.layers.Dropout(op.rate,
                                                                             name=op.name)),
    "max_pooling2d": KerasLayer(lambda keras, op, activation: keras.layers.MaxPooling2D(
        op.kernel_size, op.strides, name=op.name)),
    "flatten": KerasLayer(lambda keras, op, activation: keras.layers.Flatten(name=op.name)),
    "concatenate": KerasLayer(lambda keras, op, activation: keras.layers.Concatenate(
        name=op.name)),
}


def _l2(keras, op: Op) -> dict[str, Any]:
  return {"kernel_regularizer": keras.regularizers.l2(op.l2)} if op.l2 else {}


def to_keras(model: nn.Module):
  """The Keras model of a plan (`jaxlab.models.walk` with `KERAS_LAYERS`): the same layers,
  order, names and settings; the output layer with Keras's softmax. Only a model of the plan
  families has one (`jaxlab.models.plan_of`)."""
  plan = plan_of(model, "Keras export and parity")
  keras = import_keras()

  def layer(op: Op, x):
    activation = "softmax" if op is plan[-1] else (op.activation or "linear")
    return KERAS_LAYERS[op.kind].build(keras, op, activation)(x)

  inputs = keras.Input(shape=model.input_shape())
  outputs = walk(plan, inputs, layer, layer)
  return keras.Model(inputs, outputs, name=type(model).__name__.lower())


class KerasWeightsError(BadValue):
  """A Keras weights file that does not fit a jaxlab model."""


def keras_order(model: nn.Module) -> list[Op]:
  """The plan's ops in the order Keras's `model.layers` lists the same architecture."""
  entries: list[tuple[int, int, int, Op]] = []  # (-depth from the output, path, position, op)
  counter = [0]

  def visit(ops, depth_after: int, path: int) -> None:
    # `depth_after` is the depth (counted from the output) of what consumes the last op.
    depth = depth_after + len(ops)
    for op in ops:
      entries.append((-depth, path, counter[0], op))
      counter[0] += 1
      if op.paths:
        for i, p in enumerate(op.paths):
          visit(p, depth, path * 10 + i + 1)
      depth -= 1

  visit(list(plan_of(model, "Keras export and parity")), -1, 0)
  return [op for *_, op in sorted(entries, key=lambda e: e[:3])]


def keras_layers_by_op(keras_model, model: nn.Module) -> dict[str, Any]:
  """jaxlab op name -> the Keras layer that computes it, matched in Keras's layer order."""
  theirs = [l for l in keras_model.layers if type(l).__name__ != "InputLayer"]
  ours = keras_order(model)
  if len(theirs) != len(ours):
    raise KerasWeightsError(f"the Keras model has {len(theirs)} layers, the jaxlab model "
                            f"{len(ours)}: not the same architecture")
  out = {}
  for op, layer in zip(ours, theirs):
    if type(layer).__name__ != op.keras_type:
      raise KerasWeightsError(f"Keras layer {layer.name!r} is a {type(layer).__name__} where "
                              f"jaxlab has {op.name!r}, a {op.keras_type}")
    out[op.name] = layer
  return out


def keras_capture(keras_model, model: nn.Module, x: np.ndarray) -> dict[str, np.ndarray]:
  """Every Keras layer's output on `x` in inference mode, under the jaxlab layer's name."""
  keras = import_keras()
  layers = keras_layers_by_op(keras_model, model)
  inputs = keras_model.inputs[0] if len(keras_model.inputs) == 1 else keras_model.inputs
  probe = keras.Model(inputs, [layer.output for layer in layers.values()])
  x = np.asarray(x, np.float32)
  if keras.backend.backend() == "jax":  # One compiled call, not Keras's ops one by one.
    import jax
    call = jax.jit(lambda trainable, other, x: probe.stateless_call(trainable, other, x,
                                                                    training=False)[0])
    outputs = call([v.value for v in probe.trainable_variables],
                   [v.value for v in probe.non_trainable_variables], x)
  else:
    outputs = probe(x, training=False)
  return {name: np.asarray(out) for name, out in zip(layers, outputs)}
