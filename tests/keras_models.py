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


class _Layers(list):
  """What the reports' code adds its layers to (`model.add`), collected to make the Sequential
  model in one build: Keras rebuilds a model at every `add` once its input is known."""

  add = list.append


def _sequential(input_shape, body) -> keras.Model:
  layers_ = _Layers()
  body(layers_)
  return keras.Sequential([keras.Input(shape=input_shape), *layers_])


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


# ----------------------------------------------------------------------------- Lab 04
from keras.layers import Conv2D, Flatten, MaxPooling2D  # noqa: E402


def alexnet(bn=True, conv_dropout=None, dense_dropout=0.5, l2=None, dense_activation="tanh",
            pool_stride=False, input_shape=(28, 28, 1)):
  """The report's AlexNet code; its variants differ only in the marked places."""
  reg = dict(kernel_regularizer=regularizers.l2(l2)) if l2 else {}
  pad = dict(padding="same") if pool_stride else {}
  pools = [((3, 3), (2, 2)), ((3, 3), (2, 2)), ((2, 2), (2, 2))] if pool_stride else \
      [((3, 3), (1, 1))] * 3

  def block_end(model, i):
    model.add(MaxPooling2D(pool_size=pools[i][0], strides=pools[i][1]))
    if bn:
      model.add(BatchNormalization())
    if conv_dropout:
      model.add(Dropout(conv_dropout[i]))

  def body(model):
    model.add(Conv2D(96, kernel_size=(11, 11), strides=(1, 1), activation="relu", **pad, **reg))
    block_end(model, 0)
    model.add(Conv2D(256, kernel_size=(5, 5), activation="relu", **pad, **reg))
    block_end(model, 1)
    model.add(Conv2D(256, kernel_size=(3, 3), activation="relu", **pad, **reg))
    model.add(Conv2D(384, kernel_size=(3, 3), activation="relu", **pad, **reg))
    model.add(Conv2D(384, kernel_size=(3, 3), activation="relu", **pad, **reg))
    block_end(model, 2)
    model.add(Flatten())
    model.add(Dense(4096, activation=dense_activation, **reg))
    if dense_dropout:
      model.add(Dropout(dense_dropout))
    model.add(Dense(4096, activation=dense_activation, **reg))
    if dense_dropout:
      model.add(Dropout(dense_dropout))
    model.add(Dense(10, activation="softmax"))
  return _sequential(input_shape, body)


def vgg(input_shape, bn=True, conv_dropout=None, dense_dropout=0.5, deep_head=False):
  """The report's VGG code; its variants differ only in the marked places."""
  def body(model):
    for i, (filters, n, stride) in enumerate(((64, 2, 2), (128, 2, 2), (256, 3, 2),
                                              (512, 3, 1), (512, 3, 1))):
      for _ in range(n):
        model.add(Conv2D(filters, 3, activation="relu", padding="same"))
      model.add(MaxPooling2D(2, stride))
      if bn:
        model.add(BatchNormalization())
      if conv_dropout:
        model.add(Dropout(conv_dropout[i]))
    model.add(Flatten())
    if deep_head:
      for units in (4096, 1024, 4096):
        model.add(Dense(units, activation="relu"))
        model.add(BatchNormalization())
        model.add(Dropout(0.5))
    else:
      model.add(Dense(4096, activation="relu"))
      model.add(Dropout(dense_dropout))
      model.add(Dense(4096, activation="relu"))
      model.add(Dropout(dense_dropout))
    model.add(Dense(10, activation="softmax"))
  return _sequential(input_shape, body)


SHRINKING = [0.1, 0.2, 0.3, 0.4, 0.5]
LAB04_BUILDERS = {
    "alexnet": lambda shape: alexnet(input_shape=shape),
    "alexnet_no_bn": lambda shape: alexnet(bn=False, input_shape=shape),
    "alexnet_no_dense_dropout": lambda shape: alexnet(dense_dropout=None, input_shape=shape),
    "alexnet_conv_dropout": lambda shape: alexnet(conv_dropout=[0.25] * 3, input_shape=shape),
    "alexnet_l2": lambda shape: alexnet(conv_dropout=[0.1, 0.1, 0.4], l2=0.01,
                                        dense_activation="relu", input_shape=shape),
    "alexnet_pool_stride": lambda shape: alexnet(pool_stride=True, input_shape=shape),
    "vgg_fashion_mnist": lambda shape: vgg(shape),
    "vgg_cifar10": lambda shape: vgg(shape),
    "vgg_cifar10_dropout04": lambda shape: vgg(shape, dense_dropout=0.4),
    "vgg_cifar10_many_dropouts": lambda shape: vgg(shape, conv_dropout=[0.5] * 5),
    "vgg_cifar10_shrinking_dropouts": lambda shape: vgg(shape, conv_dropout=SHRINKING),
    "vgg_cifar10_dropouts_no_bn": lambda shape: vgg(shape, bn=False, conv_dropout=SHRINKING),
    "vgg_cifar10_deep_head": lambda shape: vgg(shape, conv_dropout=SHRINKING, deep_head=True),
}
"""Each Lab 04 architecture for any input shape: the report's code with `input_shape` changed."""

# The input shape each Lab 04 experiment is declared with (its data set's).
LAB04_SHAPES = {name: (28, 28, 1) if name.startswith("alexnet") or name == "vgg_fashion_mnist"
                else (32, 32, 3) for name in LAB04_BUILDERS}
MODELS.update({name: (lambda n=name: LAB04_BUILDERS[n](LAB04_SHAPES[n])) for name in LAB04_SHAPES})


def build(name: str, input_shape: tuple[int, ...] | None = None) -> keras.Model:
  """A new Keras model of experiment `name` (a Lab 04 one refitted to `input_shape`, default its
  own). Building creates every variable op by op (seconds for the deepest), so a test module
  builds each (model, input size) once, for all its tests (tests/test_keras.py's fixture)."""
  if input_shape is None or name not in LAB04_BUILDERS:
    return MODELS[name]()
  return LAB04_BUILDERS[name](tuple(input_shape))
