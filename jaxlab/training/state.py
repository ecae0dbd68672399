"""The train state: one pytree of params, BatchNorm statistics, optimizer state, step and RNG.

The state is arrays only; what computes on it (the model, its optimizer, its metrics) is a
`Setup`, which the compiled steps (`jaxlab.training.steps`) and the state's initialization close over.
A Setup is hashable by value, so a second run of an equal setup (another seed, another
learning rate, an equal model object made anew) reuses the programs compiled for the first.

Made for one run or stacked for a group (restoring one from a run directory: `jaxlab.rundir.checkpoint`).
A state is made by one compiled program (`init_program`): initialization, the optimizer's
init and the keys, instead of dozens of small ones run op by op. A group of K members (seeds
and learning rates of one architecture, trained as one vmapped state) is the same program under
`jax.vmap`: member k of `create_group_state` equals `create_train_state` with its seed and rate.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from jaxlab import metrics as metrics_lib
from jaxlab.caches import cached
from jaxlab.config import TrainConfig
from jaxlab.data import DATASETS, DatasetInfo
from jaxlab.experiment import build_model, get_experiment
from jaxlab.models import init_rngs
from jaxlab.optim import make_optimizer, with_learning_rate


@dataclasses.dataclass(frozen=True)
class Setup:
  """What a run's state and compiled steps are made from: the model (fitted to the data set,
  in its precision), its optimizer, its metrics (`jaxlab.metrics.table`) and the shape of one
  example (H, W, C). `injected`: whether the optimizer's learning rate lives in its state
  (`jaxlab.optim.make_optimizer`); where it does not, the rate is fixed in the optimizer."""

  model: nn.Module
  optimizer: optax.GradientTransformation
  metrics: metrics_lib.Table
  example_shape: tuple[int, ...]
  injected: bool = True

  @property
  def metric_names(self) -> tuple[str, ...]:
    return metrics_lib.names(self.metrics)


def make_setup(model: nn.Module, example_shape: Sequence[int], optimizer: str = "adam",
               learning_rate: float | None = None,
               metrics: dict[str, Any] | None = None) -> Setup:
  """A Setup of `model` (fitted already, in its precision) on examples of `example_shape`, with
  the optimizer of that name (`jaxlab.optim`; `learning_rate` for one that cannot be injected)
  and `metrics` besides loss and accuracy. (`setup` makes an experiment's.)"""
  tx, injected = make_optimizer(optimizer, learning_rate)
  return Setup(model, tx, metrics_lib.table(metrics), tuple(example_shape), injected)


def setup(config: TrainConfig, dataset: DatasetInfo | None = None,
          learning_rates: Sequence[float] = ()) -> Setup:
  """What the state and the compiled steps of `config`'s runs are made from: its model (on
  `dataset`, default the config's), optimizer and metrics. Runs of several `learning_rates`
  share one optimizer, whose learning rate must then live in its state
  (`jaxlab.optim.make_optimizer`)."""
  exp = get_experiment(config.experiment)
  info = dataset or DATASETS.get(config.dataset)
  shared = len(set(learning_rates)) > 1
  return make_setup(build_model(exp, info, config.precision), info.image_shape,
                    config.optimizer, None if shared else config.learning_rate, exp.metrics)


@struct.dataclass
class TrainState:
  """Params, optimizer state, step, BatchNorm statistics and the dropout RNG: arrays only."""

  step: jax.Array
  params: Any
  opt_state: Any
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

def seed_keys(seed: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(init, dropout, shuffle) keys: three independent streams from one seed."""
  init, dropout, shuffle = jax.random.split(jax.random.PRNGKey(seed), 3)
  return init, dropout, shuffle


def epoch_keys(seeds: Sequence[Any], epoch: int) -> jax.Array:
  """Each seed's key of epoch `epoch`'s order (`fold_in` of its shuffle key and the epoch),
  stacked: member k of a group takes the examples in the order `permutation(keys[k])`
  (`jaxlab.training.steps.train_epoch`), the order a single run of that seed takes."""
  return _epoch_keys(np.asarray(list(seeds), np.int32), epoch)  # As `init_program` takes them.


@jax.jit
def _epoch_keys(seeds: jax.Array, epoch: jax.Array) -> jax.Array:
  return jax.vmap(lambda seed: jax.random.fold_in(seed_keys(seed)[2], epoch))(seeds)


def _init(setup: Setup, seed: jax.Array, learning_rate: jax.Array) -> TrainState:
  init_key, dropout_key, _ = seed_keys(seed)
  variables = setup.model.init(init_rngs(init_key, dropout_key),
                               jnp.zeros((1, *setup.example_shape), jnp.float32))
  params = variables["params"]
  # A typed step (not Python's weakly typed 0) matches what a checkpoint restores, so a resumed
  # run reuses the programs a fresh one compiled.
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=(with_learning_rate(setup.optimizer.init(params), learning_rate)
                               if setup.injected else setup.optimizer.init(params)),
                    batch_stats=variables.get("batch_stats", {}), rng=dropout_key)


@cached
def init_program(setup: Setup, members: bool = False, sharding: Any = None) -> Callable:
  """The compiled (seed, learning rate) -> state of `setup`; with `members`, vmapped over
  arrays of seeds and rates; with `sharding`, its output placed so (replicated on a mesh)."""
  init = functools.partial(_init, setup)
  return jax.jit(jax.vmap(init) if members else init, out_shardings=sharding,
                 compiler_options=RUN_ONCE)


def create_train_state(setup: Setup, seed: int, learning_rate: float) -> TrainState:
  return init_program(setup)(jnp.asarray(seed, jnp.int32),
                             jnp.asarray(learning_rate, jnp.float32))


def create_group_state(setup: Setup, seeds: Sequence[int], learning_rates: Sequence[float],
                       sharding: Any = None) -> TrainState:
  """K members' states stacked along a leading axis, made by one compiled program (and placed
  by `sharding`, e.g. replicated on a mesh)."""
  return init_program(setup, True, sharding)(np.asarray(seeds, np.int32),
                                             np.asarray(learning_rates, np.float32))


def stack(states: Sequence[Any], sharding: Any = None) -> Any:
  """Member states (or any pytrees of one structure) stacked along a new leading axis, on the
  host and then put on the device(s) (`sharding`) in one transfer (stacking on the device would
  compile a program per array shape)."""
  return jax.device_put(jax.tree_util.tree_map(lambda *xs: np.stack(xs), *states), sharding)


def member(stacked: Any, k: int) -> Any:
  """Member `k` of a stacked state: on the host, views of its NumPy leaves; on the device, new
  arrays, taken by one compiled call (not one dispatch per leaf)."""
  if any(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(stacked)):
    return _member_on_device(stacked, k)
  return jax.tree_util.tree_map(lambda x: x[k], stacked)


@functools.partial(jax.jit, static_argnums=1)
def _member_on_device(stacked: Any, k: int) -> Any:
  return jax.tree_util.tree_map(lambda x: x[k], stacked)
