"""Optimizers by name, with Keras's default hyperparameters."""

from __future__ import annotations

import functools
from typing import Callable

import optax

from jaxlab.registry import Registry

# name -> (learning rate -> optax transformation). Epsilons are Keras's (1e-7), not optax's.
OPTIMIZERS: Registry[Callable[[float], optax.GradientTransformation]] = Registry("optimizer")
OPTIMIZERS.register("adam", lambda lr: optax.adam(lr, b1=0.9, b2=0.999, eps=1e-7))
OPTIMIZERS.register("sgd", lambda lr: optax.sgd(lr))
OPTIMIZERS.register("momentum", lambda lr: optax.sgd(lr, momentum=0.9))
OPTIMIZERS.register("nadam", lambda lr: optax.nadam(lr, b1=0.9, b2=0.999, eps=1e-7))
OPTIMIZERS.register("rmsprop", lambda lr: optax.rmsprop(lr, decay=0.9, eps=1e-7))


@functools.lru_cache(maxsize=None)
def make_optimizer(name: str, learning_rate: float) -> optax.GradientTransformation:
  """The optimizer, made once per (name, learning rate): the train state carries it as static
  data, so the same object lets a second run reuse the compiled steps."""
  if not learning_rate > 0:
    raise ValueError(f"learning rate must be positive, got {learning_rate}")
  return OPTIMIZERS.get(name)(learning_rate)
