"""Optimizers by name: Keras's defaults built in, a user's own optax function beside them.

An optimizer is a function `fn(learning_rate) -> optax.GradientTransformation`: any optax
chain, schedule, weight decay or clipping. The built-in ones (adam, sgd, momentum, nadam,
rmsprop) have Keras's hyperparameters; an experiment's own (`Experiment(optimizer=fn)`) is
registered under its function's name when the experiment is, so `--optimizer=NAME` selects
either kind and config.json records a name.

jaxlab wraps the function in `optax.inject_hyperparams`, so the learning rate lives in the
optimizer state (`opt_state.hyperparams["learning_rate"]`), not in the compiled program: runs
that differ only in learning rate share one compiled step, and the members of a vmapped group
(`train.py --learning_rates=...`) each carry their own. A function that cannot take its
learning rate as a traced value (it calls `float` on it, or passes it to a schedule that does,
such as `optax.warmup_cosine_decay_schedule`) still trains a single run, with the rate fixed in
the program, and says so in one warning; a group over learning rates then says so in one line.

The learning rate a run records each epoch (`learning_rate` in metrics.jsonl) is the one its
optimizer used last: the value an `optax.inject_hyperparams` of the function's own holds where
it injects its own schedule (`inject_hyperparams(optax.adamw)(learning_rate=schedule)`), else
the run's setting (for a function that schedules without injecting: the rate it was given, not
what its schedule makes of it; the warning says so).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from absl import logging

from jaxlab.errors import BadValue
from jaxlab.registry import Registry

Factory = Callable[..., optax.GradientTransformation]


class KerasNadamState(NamedTuple):
  count: jax.Array
  mu: Any
  nu: Any
  u_product: jax.Array


def scale_by_keras_nadam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-7
                         ) -> optax.GradientTransformation:
  """Keras's Nadam (Dozat's, with Keras's momentum schedule u_t = b1 (1 - 0.5 * 0.96^t) and its
  product), which optax's `nadam` is not; scaled by the learning rate after it."""

  def init(params):
    zeros = lambda: jax.tree_util.tree_map(jnp.zeros_like, params)
    return KerasNadamState(jnp.zeros((), jnp.int32), zeros(), zeros(), jnp.ones((), jnp.float32))

  def update(grads, state, params=None):
    step = (state.count + 1).astype(jnp.float32)
    u_t = b1 * (1.0 - 0.5 * 0.96 ** step)
    u_next = b1 * (1.0 - 0.5 * 0.96 ** (step + 1))
    u_product = state.u_product * u_t
    mu = jax.tree_util.tree_map(lambda m, g: m + (g - m) * (1 - b1), state.mu, grads)
    nu = jax.tree_util.tree_map(lambda v, g: v + (g * g - v) * (1 - b2), state.nu, grads)

    def scaled(g, m, v):
      m_hat = u_next * m / (1 - u_product * u_next) + (1 - u_t) * g / (1 - u_product)
      return m_hat / (jnp.sqrt(v / (1 - b2 ** step)) + eps)

    updates = jax.tree_util.tree_map(scaled, grads, mu, nu)
    return updates, KerasNadamState(state.count + 1, mu, nu, u_product)

  return optax.GradientTransformation(init, update)

# name -> optax factory taking the learning rate. Epsilons are Keras's (1e-7), not optax's.
OPTIMIZERS: Registry[Factory] = Registry("optimizer")
OPTIMIZERS.register("adam", lambda learning_rate: optax.adam(learning_rate, b1=0.9, b2=0.999,
                                                             eps=1e-7))
OPTIMIZERS.register("sgd", lambda learning_rate: optax.sgd(learning_rate))
OPTIMIZERS.register("momentum", lambda learning_rate: optax.sgd(learning_rate, momentum=0.9))
OPTIMIZERS.register("nadam", lambda learning_rate: optax.chain(
    scale_by_keras_nadam(), optax.scale_by_learning_rate(learning_rate)))
OPTIMIZERS.register("rmsprop", lambda learning_rate: optax.rmsprop(learning_rate, decay=0.9,
                                                                   eps=1e-7))


def register_optimizer(fn: Factory) -> str:
  """Registers a user's `fn(learning_rate)` under its function's name (again for the same
  function: a no-op) and returns the name."""
  name = getattr(fn, "__name__", "")
  if not callable(fn) or not name.isidentifier():
    raise BadValue(f"an optimizer is a named function fn(learning_rate) -> "
                   f"optax.GradientTransformation (a def, not a lambda), got {fn!r}")
  if name in OPTIMIZERS:
    if OPTIMIZERS.get(name) is not fn:
      raise BadValue(f"optimizer name {name!r} ({fn.__module__}) is already taken by another "
                     "function; give the function another name")
    return name
  OPTIMIZERS.register(name, fn)
  return name


def make_optimizer(name: str, learning_rate: float | None = None
                   ) -> tuple[optax.GradientTransformation, bool]:
  """(the optimizer, whether its learning rate is injected), made once per name: the same
  object lets every run of an architecture (any seed, any learning rate) reuse the compiled
  steps, its learning rate set in the state (`with_learning_rate`). An optimizer whose
  function cannot be injected is made once per `learning_rate` (the rate fixed in it)."""
  injected = _injected(name)
  if injected is not None:
    return injected, True
  if learning_rate is None:
    raise BadValue(f"optimizer {name!r} cannot take its learning rate as a traced value "
                   "(optax.inject_hyperparams), so runs of several learning rates cannot share "
                   "it: give one learning rate, or make the function use its argument as an "
                   "array (no float(), no `if` on it)")
  return _fixed(name, learning_rate), False


@functools.lru_cache(maxsize=None)
def _injected(name: str) -> optax.GradientTransformation | None:
  injected = optax.inject_hyperparams(OPTIMIZERS.get(name))(learning_rate=1e-3)
  try:  # Traced, as every step will call it.
    jax.eval_shape(injected.init, {"w": jax.ShapeDtypeStruct((1,), jnp.float32)})
  except jax.errors.JAXTypeError:
    return None
  return injected


@functools.lru_cache(maxsize=None)
def _fixed(name: str, learning_rate: float) -> optax.GradientTransformation:
  _warn_fixed(name)
  return OPTIMIZERS.get(name)(learning_rate)


@functools.cache
def _warn_fixed(name: str) -> None:
  logging.warning(
      "optimizer %r cannot take its learning rate as a traced value (optax.inject_hyperparams): "
      "it is fixed in the compiled step, and metrics.jsonl records the rate given to the "
      "function, not what a schedule inside it makes of it (to record that, inject the "
      "schedule yourself: optax.inject_hyperparams(optax.adam)(learning_rate=schedule))", name)


def with_learning_rate(opt_state: Any, learning_rate: Any) -> Any:
  """`opt_state` of an injected optimizer with its learning rate replaced (works under jit and
  vmap); any other state as it is (its rate is fixed in the optimizer)."""
  if not hasattr(opt_state, "hyperparams"):
    return opt_state
  hyperparams = {**opt_state.hyperparams,
                 "learning_rate": jnp.asarray(learning_rate, jnp.float32)}
  return opt_state._replace(hyperparams=hyperparams)


def scheduled_learning_rate(opt_state: Any, injected: bool = True) -> Any | None:
  """The learning rate an optimizer function's own `inject_hyperparams` holds (the innermost,
  where there are several; a schedule's value at the last step), or None where it has none.
  `injected`: whether the state is jaxlab's wrapper around the function's (whose own rate
  is then the one inside)."""
  inner = getattr(opt_state, "inner_state", None) if injected else opt_state
  if inner is None:
    return None
  found = optax.tree_utils.tree_get_all_with_path(inner, "learning_rate")
  return max(found, key=lambda pair: len(pair[0]))[1] if found else None
