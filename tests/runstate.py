"""Reading a run directory's newest train state, for tests that compare runs array by array."""

import json

import numpy as np
from flax import traverse_util

from jaxlab import checkpoint


def final_state(run):
  """Every array of a run's newest checkpoint, by path, in float64."""
  path = sorted((run / "checkpoints").glob("step_*.msgpack"))[-1]
  return {"/".join(k): np.asarray(v, np.float64) for k, v in
          traverse_util.flatten_dict(checkpoint.read(path)[1]["state"]).items()}


def biases_before_batch_norm(run):
  """params/NAME/bias of every layer whose output BatchNormalization normalizes: in training
  their exact gradient is 0 (the batch mean takes the bias away), so their values are float
  rounding noise that any change in the order of sums (vmap, devices) accumulates differently."""
  layers = json.loads((run / "config.json").read_text())["model"]["layers"]
  names, last = set(), None
  for layer in layers:
    if layer["type"] in ("Dense", "Conv2D"):
      last = layer["name"]
    elif layer["type"] == "BatchNormalization" and last:
      names.add(f"params/{last}/bias")
  return names
