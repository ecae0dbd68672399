"""The train state: one pytree of params, BatchNorm statistics, optimizer state, step and RNG.

Made for one run or stacked for a group (restoring one from a run directory: `jaxlab.checkpoint`).

A state is made by one compiled program (`init_program`): initialization, the optimizer's
init and the keys, instead of dozens of small ones run op by op. A group of K members (seeds
and learning rates of one architecture, trained as one vmapped state) is the same program under
`jax.vmap`: member k of `create_group_state` equals `create_train_state` with its seed and rate.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from jaxlab.models import PlanModel
from jaxlab.optim import with_learning_rate


class TrainState(train_state.TrainState):
  """Params, optimizer state and step (from Flax), plus BatchNorm statistics and the RNG."""

  batch_stats: Any = None
  rng: jax.Array | None = None  # Dropout key; each step folds in its step number.

  @property
  def variables(self) -> dict[str, Any]:
    return {"params": self.params, "batch_stats": self.batch_stats}


# Compiler options of programs that run once per run or epoch (initialization, an epoch's
# order): XLA's backend optimizations cost seconds of compile time (the random draws of
# initialization most: 7.9 s for vgg_cifar10 on a 2-core AMD EPYC, 1.9 s without them) and
# save milliseconds of a program that runs once. The values they compute are the same.
RUN_ONCE = {"xla_backend_optimization_level": 0}

NO_STEP = np.iinfo(np.int32).max  # `first_nonfinite` of steps that were all finite.


def train_sums_zeros() -> dict[str, float | int]:
  """The host-side metric sums of no train step (a Python number per metric): the running sums
  of an epoch start here, and a checkpoint holds them beside the state (`jaxlab.checkpoint`)."""
  return {"data_loss": 0.0, "l2_loss": 0.0, "correct": 0, "count": 0, "nonfinite": 0,
          "first_nonfinite": int(NO_STEP)}


def seed_keys(seed: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(init, dropout, shuffle) keys: three independent streams from one seed."""
  init, dropout, shuffle = jax.random.split(jax.random.PRNGKey(seed), 3)
  return init, dropout, shuffle


def _init(model: PlanModel, tx: optax.GradientTransformation, seed: jax.Array,
          learning_rate: jax.Array) -> TrainState:
  init_key, dropout_key, _ = seed_keys(seed)
  variables = model.init(init_key, jnp.zeros((1,) + model.input_shape(), jnp.float32))
  params = variables["params"]
  # A typed step (not Python's weakly typed 0) matches what a checkpoint restores, so a resumed
  # run reuses the programs a fresh one compiled.
  return TrainState(step=jnp.zeros((), jnp.int32), apply_fn=model.apply, params=params, tx=tx,
                    opt_state=with_learning_rate(tx.init(params), learning_rate),
                    batch_stats=variables.get("batch_stats", {}), rng=dropout_key)


@functools.lru_cache(maxsize=64)
def init_program(model: PlanModel, tx: optax.GradientTransformation, members: bool = False,
                 sharding: Any = None) -> Callable:
  """The compiled (seed, learning rate) -> state of `model`; with `members`, vmapped over
  arrays of seeds and rates; with `sharding`, its output placed so (replicated on a mesh)."""
  init = functools.partial(_init, model, tx)
  return jax.jit(jax.vmap(init) if members else init, out_shardings=sharding,
                 compiler_options=RUN_ONCE)


def create_train_state(model: PlanModel, tx: optax.GradientTransformation, seed: int,
                       learning_rate: float) -> TrainState:
  return init_program(model, tx)(jnp.asarray(seed, jnp.int32),
                                 jnp.asarray(learning_rate, jnp.float32))


def create_group_state(model: PlanModel, tx: optax.GradientTransformation, seeds: Sequence[int],
                       learning_rates: Sequence[float], sharding: Any = None) -> TrainState:
  """K members' states stacked along a leading axis, made by one compiled program (and placed
  by `sharding`, e.g. replicated on a mesh)."""
  return init_program(model, tx, True, sharding)(np.asarray(seeds, np.int32),
                                                 np.asarray(learning_rates, np.float32))


def stack(states: Sequence[Any], sharding: Any = None) -> Any:
  """Member states (or any pytrees of one structure) stacked along a new leading axis, on the
  host and then put on the device(s) (`sharding`) in one transfer (stacking on the device would
  compile a program per array shape)."""
  return jax.device_put(jax.tree_util.tree_map(lambda *xs: np.stack(xs), *states), sharding)


def member(stacked: Any, k: int) -> Any:
  """Member `k` of a stacked state (indexing every leaf; NumPy leaves stay NumPy)."""
  return jax.tree_util.tree_map(lambda x: x[k], stacked)
