"""The reports' Keras models, transcribed from their code, as references for jaxlab's tests.

Each builder follows the report's code line by line (same layers, order, sizes, padding and
strides) and is written without reference to jaxlab's declarations, so a test that compares
the two compares jaxlab against the report. Keras 3 runs on its JAX backend: no TensorFlow.
"""

from __future__ import annotations

import math
import os
import random

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
from keras import layers, regularizers  # noqa: E402
from keras.layers import BatchNormalization, Dense, Dropout  # noqa: E402


def _sequential(input_shape, body) -> keras.Model:
  model = keras.Sequential()
  model.add(keras.Input(shape=input_shape))
  body(model)
  return model


# ----------------------------------------------------------------------------- Lab 02


def _d(model, n, bn=True):
  model.add(Dense(n, activation="relu"))
  if bn:
    model.add(BatchNormalization())


def _mlp(sizes, final_dropout=0.15):
  def body(model):
    for n in sizes:
      _d(model, n)
    if final_dropout:
      model.add(Dropout(final_dropout))
    model.add(Dense(10, activation="softmax"))
  return _sequential((784,), body)


def mlp_random_sizes(seed=0):
  def body(model):
    model.add(Dense(64, activation="relu"))
    model.add(BatchNormalization())
    size = [512, 28, 64, 32, 16]
    rng = random.Random(seed)
    for _ in range(50):
      model.add(Dense(rng.choice(size), activation="relu"))
      model.add(BatchNormalization())
    model.add(Dense(64, activation="relu"))
    model.add(BatchNormalization())
    model.add(Dropout(0.15))
    model.add(Dense(10, activation="softmax"))
  return _sequential((784,), body)


def mlp_big_small_big_big():
  def body(model):
    for n in (512, 256, 128, 64, 32):
      _d(model, n)
    for _ in range(5):
      _d(model, 512)
    _d(model, 64)
    model.add(Dropout(0.15))
    model.add(Dense(10, activation="softmax"))
  return _sequential((784,), body)


def mlp_small_big_small():
  def body(model):
    for n in (32, 64, 128, 256, 512):
      _d(model, n)
    for _ in range(2):
      for units in [256, 128, 64, 32]:
        _d(model, units)
    _d(model, 32)
    model.add(Dropout(0.15))
    model.add(Dense(10, activation="softmax"))
  return _sequential((784,), body)


def mlp_parallel_paths():
  input_layer = keras.Input(shape=(784,))
  path1 = Dense(64, activation="relu")(input_layer)
  path1 = BatchNormalization()(path1)
  path1 = Dense(128, activation="relu")(path1)
  path1 = BatchNormalization()(path1)
  path2 = Dense(32, activation="relu")(input_layer)
  path2 = BatchNormalization()(path2)
  path2 = Dense(64, activation="relu")(path2)
  path2 = BatchNormalization()(path2)
  concatenated = layers.concatenate([path1, path2])
  output_layer = Dense(256, activation="relu")(concatenated)
  output_layer = BatchNormalization()(output_layer)
  output_layer = Dense(10, activation="softmax")(output_layer)
  return keras.Model(inputs=input_layer, outputs=output_layer)


def mlp_wide_narrow():
  def body(model):
    _d(model, 64)
    for _ in range(5):
      _d(model, 256)
      _d(model, 32)
    model.add(Dense(10, activation="softmax"))
  return _sequential((784,), body)


def mlp_back_n_forth():
  def body(model):
    _d(model, 32, bn=False)
    _d(model, 64)
    _d(model, 32, bn=False)
    _d(model, 128)
    _d(model, 16, bn=False)
    _d(model, 512)
    _d(model, 256)
    model.add(Dense(10, activation="softmax"))
  return _sequential((784,), body)


def mlp_thick_thin():
  def body(model):
    _d(model, 64)
    for _ in range(5):
      for _ in range(5):
        _d(model, 512)
      for _ in range(3):
        _d(model, 64)
    model.add(Dense(10, activation="softmax"))
  return _sequential((784,), body)


def mlp_dropout():
  def body(model):
    for n in (512, 256, 128, 64):
      model.add(Dense(n, activation="relu"))
      model.add(BatchNormalization())
      model.add(Dropout(0.5))
    model.add(Dense(10, activation="softmax"))
  return _sequential((784,), body)


LAB02 = {
    "mlp_baseline": lambda: _mlp([128] * 3),
    "mlp_deep": lambda: _mlp([128] * 23),
    "mlp_wide_shallow": lambda: _mlp([1024] * 5),
    "mlp_halving": lambda: _mlp([512, 256, 128, 64, 32]),
    "mlp_random_sizes": mlp_random_sizes,
    "mlp_big_small_big": lambda: _mlp([64, 512, 256, 128, 64, 32, 32, 64, 128, 256, 512],
                                      final_dropout=0),
    "mlp_big_small_big_big": mlp_big_small_big_big,
    "mlp_small_big_small": mlp_small_big_small,
    "mlp_parallel_paths": mlp_parallel_paths,
    "mlp_diamond": lambda: _mlp([32, 64, 128, 128, 128, 64, 32]),
    "mlp_wide_narrow": mlp_wide_narrow,
    "mlp_back_n_forth": mlp_back_n_forth,
    "mlp_thick_thin": mlp_thick_thin,
    "mlp_dropout": mlp_dropout,
}

# Lab 02 experiments whose Keras code the report prints (the others are a picture or a sentence).
LAB02_WITH_CODE = ("mlp_random_sizes", "mlp_big_small_big", "mlp_big_small_big_big",
                   "mlp_small_big_small", "mlp_parallel_paths", "mlp_wide_narrow",
                   "mlp_back_n_forth", "mlp_thick_thin", "mlp_dropout")

MODELS = dict(LAB02)


def counts(model: keras.Model) -> dict[str, int]:
  """Keras's own parameter counts, as `model.summary()` reports them."""
  non_trainable = sum(math.prod(w.shape) for w in model.non_trainable_weights)
  total = model.count_params()
  return {"total_params": total, "trainable_params": total - non_trainable,
          "non_trainable_params": non_trainable}
