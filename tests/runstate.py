"""Train states array by array, for tests that compare runs and steps: a run directory's newest
state, a state in memory, and their largest difference against each array's scale; and a hook
that kills a run after an epoch, for the runs such tests resume."""

import json

import numpy as np
from flax import serialization, traverse_util

from jaxlab.rundir import checkpoint
from jaxlab.training.hooks import OnEpochEnd


class Crash(Exception):
  """What `crash_after` raises: a run killed at an epoch's end, after its files are written."""


def crash_after(epoch):
  """A hook that raises `Crash` at the end of epoch `epoch`."""
  def callback(e, record, state):
    if e == epoch:
      raise Crash(f"killed after epoch {e}")
  return OnEpochEnd(callback)


def arrays(state_dict):
  """Every array of a state (a state dict, or a TrainState), by path, in float64."""
  if not isinstance(state_dict, dict):
    state_dict = serialization.to_state_dict(state_dict)
  return {"/".join(k): np.asarray(v, np.float64)
          for k, v in traverse_util.flatten_dict(state_dict).items()}


def final_state(run):
  """Every array of a run's newest checkpoint, by path, in float64."""
  path = sorted((run / "checkpoints").glob("step_*.msgpack"))[-1]
  return arrays(checkpoint.read(path)[1]["state"])


def largest_difference(a, b, skip=()):
  """max over arrays (but `skip`) of max|a - b| / max|b|: differences against each array's
  scale; `a` and `b` as `arrays` gives them."""
  assert a.keys() == b.keys()
  return max(np.abs(a[k] - b[k]).max() / max(np.abs(b[k]).max(), 1e-30) for k in a
             if k not in skip)


def biases_before_batch_norm(run):
  """params/NAME/bias of every layer whose output BatchNormalization normalizes: in training
  their exact gradient is 0 (the batch mean takes the bias away), so their values are float
  rounding noise that any change in the order of sums (vmap, devices) accumulates differently.
  `run`: a run directory, or a model's layers as `jaxlab.models.describe` gives them."""
  layers = (json.loads((run / "config.json").read_text())["model"]["layers"]
            if not isinstance(run, list) else run)
  names, last = set(), None
  for layer in layers:
    if layer["type"] in ("Dense", "Conv2D"):
      last = layer["name"]
    elif layer["type"] == "BatchNormalization" and last:
      names.add(f"params/{last}/bias")
  return names


def assert_rounding_only(differences, rounding=1e-5, flip=1e-2):
  """`differences`: `largest_difference` of two equivalent computations of one step, from the
  same state, at each of many states. Most steps agree to float rounding (the median within
  `rounding`). A step where rounding breaks a near-tie the other way (which of two nearly equal
  values a max-pooling window passes the gradient to, the side of zero of a pre-activation)
  differs by a finite amount, but no more than `flip`; on random pixels that happens in a few
  steps in a hundred (a CNN's 50,000 pooling windows a step). A wrong computation (statistics
  of a device's part of the batch, a missing all-reduce) differs in every step, by more."""
  differences = sorted(differences)
  assert differences[len(differences) // 2] < rounding, differences
  assert differences[-1] < flip, differences
