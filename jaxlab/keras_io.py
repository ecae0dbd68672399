"""Keras 3 models from jaxlab plans, and jaxlab variables written into them.

Keras is an optional dependency (the `test` and `bench` extras); it is imported when these
functions run, with the JAX backend unless KERAS_BACKEND says otherwise.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from jaxlab.models import BN_EPSILON, BN_MOMENTUM, Op, PlanModel


def import_keras():
  os.environ.setdefault("KERAS_BACKEND", "jax")
  try:
    import keras
  except ImportError:
    raise ImportError("Keras is needed for this; install it with `pip install -e '.[test]'`") from None
  return keras


def _keras_layer(keras, op: Op, is_output: bool):
  layers, regularizers = keras.layers, keras.regularizers
  reg = {"kernel_regularizer": regularizers.l2(op.l2)} if op.l2 else {}
  if op.kind == "dense":
    activation = "softmax" if is_output else (op.activation or "linear")
    return layers.Dense(op.features, activation=activation, name=op.name, **reg)
  if op.kind == "conv2d":
    return layers.Conv2D(op.features, op.kernel_size, strides=op.strides, padding=op.padding,
                         activation=op.activation or "linear", name=op.name, **reg)
  if op.kind == "batch_normalization":
    return layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=op.name)
  if op.kind == "dropout":
    return layers.Dropout(op.rate, name=op.name)
  if op.kind == "max_pooling2d":
    return layers.MaxPooling2D(op.kernel_size, op.strides, name=op.name)
  if op.kind == "flatten":
    return layers.Flatten(name=op.name)
  raise ValueError(f"no Keras layer for op kind {op.kind!r}")


def to_keras(model: PlanModel):
  """The Keras model of a plan: same layers, order, names and settings; softmax output."""
  keras = import_keras()
  plan = model.plan()

  def run(ops, x, top):
    for i, op in enumerate(ops):
      if op.kind == "concatenate":
        x = keras.layers.Concatenate(name=op.name)([run(p, x, False) for p in op.paths])
      else:
        x = _keras_layer(keras, op, top and i == len(ops) - 1)(x)
    return x

  inputs = keras.Input(shape=model.input_shape())
  return keras.Model(inputs, run(plan, inputs, True), name=type(model).__name__.lower())


def keras_weights(op: Op, params: dict[str, Any], batch_stats: dict[str, Any]) -> list[np.ndarray]:
  """A jaxlab layer's variables in the order Keras's `layer.get_weights()` lists them."""
  if op.kind in ("dense", "conv2d"):
    p = params[op.name]
    return [np.asarray(p["kernel"]), np.asarray(p["bias"])]
  if op.kind == "batch_normalization":
    p, s = params[op.name], batch_stats[op.name]
    return [np.asarray(p["scale"]), np.asarray(p["bias"]), np.asarray(s["mean"]),
            np.asarray(s["var"])]
  return []


def set_keras_weights(keras_model, model: PlanModel, variables: dict[str, Any]) -> None:
  """Writes jaxlab variables (params and batch_stats) into a model made by `to_keras`."""
  from jaxlab.models import iter_ops

  params, stats = variables["params"], variables.get("batch_stats", {})
  for op in iter_ops(model.plan()):
    weights = keras_weights(op, params, stats)
    if weights:
      keras_model.get_layer(op.name).set_weights(weights)
