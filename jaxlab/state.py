"""The train state: one pytree of params, BatchNorm statistics, optimizer state, step and RNG."""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from jaxlab.models import PlanModel


class TrainState(train_state.TrainState):
  """Params, optimizer state and step (from Flax), plus BatchNorm statistics and the RNG."""

  batch_stats: Any = None
  rng: jax.Array | None = None  # Dropout key; each step folds in its step number.

  @property
  def variables(self) -> dict[str, Any]:
    return {"params": self.params, "batch_stats": self.batch_stats}


def seed_keys(seed: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(init, dropout, shuffle) keys: three independent streams from one seed."""
  init, dropout, shuffle = jax.random.split(jax.random.PRNGKey(seed), 3)
  return init, dropout, shuffle


@functools.lru_cache(maxsize=64)
def _jitted_init(model: PlanModel) -> Callable:
  return jax.jit(model.init)


def create_train_state(model: PlanModel, tx: optax.GradientTransformation,
                       seed: int) -> TrainState:
  init_key, dropout_key, _ = seed_keys(seed)
  x = jnp.zeros((1,) + model.input_shape(), jnp.float32)
  variables = _jitted_init(model)(init_key, x)
  state = TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                            batch_stats=variables.get("batch_stats", {}), rng=dropout_key)
  # A typed step (not Python's weakly typed 0) matches what a checkpoint restores, so a resumed
  # run reuses the programs a fresh one compiled.
  return state.replace(step=jnp.zeros((), jnp.int32))
