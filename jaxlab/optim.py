"""Optimizers by name, with Keras's default hyperparameters and the learning rate in the state.

Each optimizer is wrapped in `optax.inject_hyperparams`, so the learning rate lives in the
optimizer state (`opt_state.hyperparams["learning_rate"]`), not in the compiled program: runs
that differ only in learning rate share one compiled step, and the members of a vmapped group
(`train.py --learning_rates=...`) each carry their own.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax.numpy as jnp
import optax

from jaxlab.registry import Registry

# name -> optax factory taking the learning rate. Epsilons are Keras's (1e-7), not optax's.
OPTIMIZERS: Registry[Callable[..., optax.GradientTransformation]] = Registry("optimizer")
OPTIMIZERS.register("adam", lambda learning_rate: optax.adam(learning_rate, b1=0.9, b2=0.999,
                                                             eps=1e-7))
OPTIMIZERS.register("sgd", lambda learning_rate: optax.sgd(learning_rate))
OPTIMIZERS.register("momentum", lambda learning_rate: optax.sgd(learning_rate, momentum=0.9))
OPTIMIZERS.register("nadam", lambda learning_rate: optax.nadam(learning_rate, b1=0.9, b2=0.999,
                                                               eps=1e-7))
OPTIMIZERS.register("rmsprop", lambda learning_rate: optax.rmsprop(learning_rate, decay=0.9,
                                                                   eps=1e-7))


@functools.lru_cache(maxsize=None)
def make_optimizer(name: str) -> optax.GradientTransformation:
  """The optimizer, made once per name: the train state carries it as static data, so the same
  object lets every run of an architecture (any seed, any learning rate) reuse the compiled
  steps. Its learning rate is set in the state (`with_learning_rate`)."""
  return optax.inject_hyperparams(OPTIMIZERS.get(name))(learning_rate=1e-3)


def with_learning_rate(opt_state: Any, learning_rate: Any) -> Any:
  """`opt_state` of `make_optimizer` with its learning rate replaced (works under jit/vmap)."""
  hyperparams = {**opt_state.hyperparams,
                 "learning_rate": jnp.asarray(learning_rate, jnp.float32)}
  return opt_state._replace(hyperparams=hyperparams)
