"""Keras weights into and out of jaxlab: variables, Keras files, and run directories.

A Keras `.weights.h5` or `.keras` file is read into jaxlab's variables (every layer matched in
Keras's order and every shape checked), written from them, or imported as a new run directory
whose checkpoints hold the weights (`write_imported_run`), which every script then reads.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import flax.linen as nn
import numpy as np
from flax import serialization

from jaxlab.rundir import checkpoint, lock
from jaxlab import metrics as metrics_lib
from jaxlab.rundir.checkpoint import checkpoint_template
from jaxlab.config import TrainConfig
from jaxlab.errors import BadValue, MissingDependency, MissingFile, output
from jaxlab.experiment import describe_experiment
from jaxlab.files import link_atomic
from jaxlab.training.runfiles import RunFiles
from jaxlab.keras.model import (KERAS_LAYERS, KerasWeightsError, keras_order,
                                to_keras)
from jaxlab.models import Op, abstract_variables, describe, iter_ops, plan_of
from jaxlab.rundir.run import Run
from jaxlab.training.state import create_train_state, setup
from jaxlab.inspection.summary import param_counts


def keras_weights(op: Op, variables: dict[str, Any]) -> list[np.ndarray]:
  """A jaxlab layer's variables in the order Keras's `layer.get_weights()` lists them."""
  return [np.asarray(variables[collection][op.name][name])
          for collection, name in KERAS_LAYERS[op.kind].variables]


def set_keras_weights(keras_model, model: nn.Module, variables: dict[str, Any]) -> None:
  """Writes jaxlab variables (params and batch_stats) into a model made by `to_keras`."""
  for op in iter_ops(plan_of(model, "Keras export")):
    weights = keras_weights(op, variables)
    if weights:
      keras_model.get_layer(op.name).set_weights(weights)


# ----------------------------------------------------------------------------- import / export
#
# A Keras weights file (`.weights.h5`, or the `model.weights.h5` inside a `.keras` zip) stores
# each layer's variables under `layers/<name>/vars/<i>`, where the names are Keras's positional
# names for the model's layers in `model.layers` order: the first Dense is `dense`, the next
# `dense_1`, and so on. For a Sequential model that order is the model's; for a functional model
# with parallel paths Keras lists layers by depth, path by path at each depth. `keras_order`
# gives jaxlab's ops in that same order, so the n-th Dense of the file is the n-th Dense there.

# The kinds of layer that hold variables, in the order their layers are matched.
WEIGHTED_KINDS = tuple(kind for kind, layer in KERAS_LAYERS.items() if layer.variables)


def _suffix(name: str) -> int:
  base, _, n = name.rpartition("_")
  return int(n) if base and n.isdigit() else 0


def read_keras_weights(path: str) -> dict[str, list[list[np.ndarray]]]:
  """Per layer class (`dense`, `conv2d`, `batch_normalization`), the layers' variables in
  Keras's layer order, from a `.weights.h5` or `.keras` file."""
  import io
  import pathlib
  import zipfile

  try:
    import h5py
  except ImportError:
    raise MissingDependency("reading Keras files needs h5py: `pip install -e '.[keras]'`") from None
  p = pathlib.Path(path)
  if not p.is_file():
    raise MissingFile(f"no Keras weights file at {path}")
  try:
    if zipfile.is_zipfile(p):
      with zipfile.ZipFile(p) as z:
        if "model.weights.h5" not in z.namelist():
          raise KerasWeightsError(f"{path}: a zip without model.weights.h5 is not a .keras file")
        h5 = h5py.File(io.BytesIO(z.read("model.weights.h5")), "r")
    else:
      h5 = h5py.File(p, "r")
  except OSError as e:
    raise KerasWeightsError(f"{path}: not a Keras weights file ({e})") from None
  with h5:
    if "layers" not in h5:
      raise KerasWeightsError(f"{path}: no 'layers' group; not a Keras 3 weights file")
    by_kind: dict[str, list[tuple[int, str, list[np.ndarray]]]] = {}
    for name, group in h5["layers"].items():
      kind = name.rstrip("0123456789").rstrip("_")
      variables = group.get("vars")
      if variables is None or not len(variables):
        continue
      arrays = [np.asarray(variables[str(i)]) for i in range(len(variables))]
      by_kind.setdefault(kind, []).append((_suffix(name), name, arrays))
  return {kind: [(name, arrays) for _, name, arrays in sorted(items)]
          for kind, items in by_kind.items()}


def import_keras_weights(model: nn.Module, path: str) -> dict[str, Any]:
  """jaxlab variables (`params`, `batch_stats`) from a Keras file of the same architecture.

  Layers are matched in Keras's order, kind by kind, and every shape is checked; a mismatch
  raises KerasWeightsError naming both layers and both shapes.
  """
  ops = [op for op in keras_order(model) if op.kind in WEIGHTED_KINDS]
  template = abstract_variables(model, model.input_shape())
  file_layers = read_keras_weights(path)
  params: dict[str, Any] = {}
  stats: dict[str, Any] = {}
  for kind in WEIGHTED_KINDS:
    ours = [op for op in ops if op.kind == kind]
    theirs = file_layers.get(kind, [])
    if len(ours) != len(theirs):
      raise KerasWeightsError(
          f"{path} has {len(theirs)} {ours[0].keras_type if ours else kind} layers with weights "
          f"but the model has "
          f"{len(ours)}")
    for op, (name, arrays) in zip(ours, theirs):
      names = KERAS_LAYERS[kind].variables
      if len(arrays) != len(names):
        raise KerasWeightsError(f"Keras layer {name!r} has {len(arrays)} variables; jaxlab's "
                                f"{op.name!r} needs {len(names)}")
      for (collection, var), array in zip(names, arrays):
        expected = tuple(template[collection][op.name][var].shape)
        if array.shape != expected:
          raise KerasWeightsError(
              f"Keras layer {name!r} variable {var} has shape {array.shape} but jaxlab layer "
              f"{op.name!r} needs {expected}: the file is not this architecture")
        target = params if collection == "params" else stats
        target.setdefault(op.name, {})[var] = np.asarray(array, np.float32)
  return {"params": params, "batch_stats": stats}


def export_keras(model: nn.Module, variables: dict[str, Any], path: str):
  """Writes jaxlab variables as a Keras model: `.keras` (architecture and weights) or
  `.weights.h5` (weights only). Returns the Keras model."""
  if not (path.endswith(".keras") or path.endswith(".weights.h5")):
    raise BadValue(f"a Keras file name ends in .keras or .weights.h5, got {path!r}")
  net = to_keras(model)
  set_keras_weights(net, model, variables)
  if pathlib.Path(path).is_dir():
    raise BadValue(f"--output {path} is a directory, not a file")
  with output(path, "--output"):  # What jaxlab checks: the folder is there, and writable.
    folder = pathlib.Path(path).parent
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".write-test-{os.getpid()}"
    probe.write_bytes(b"")
    probe.unlink()
  if path.endswith(".keras"):  # Keras's own writes: an error in them is not the user's.
    net.save(path)
  else:
    net.save_weights(path)
  return net


def write_imported_run(workdir: str | pathlib.Path, config: TrainConfig,
                       variables: dict[str, Any], source: str) -> Run:
  """A run directory whose checkpoints (epoch 0) hold imported weights and a fresh optimizer,
  written by the hooks that write a trained run's files (config.json, metrics.jsonl,
  metrics.json), with status `imported`.

  Every script that reads run directories works on it; `scripts/train.py` with the same
  settings trains on from the imported weights."""
  run = Run(workdir, config)
  with lock.holding(run.root):  # One writer, as a training run.
    return _write_imported(run, config, variables, source)


def _write_imported(run: Run, config: TrainConfig, variables: dict[str, Any],
                    source: str) -> Run:
  if run.config_file.exists():
    raise BadValue(f"{run.root} already holds a run; import into a new --workdir")
  built = setup(config)
  state = create_train_state(built, config.seed, config.learning_rate)
  imported = state.replace(params=variables["params"], batch_stats=variables["batch_stats"])
  checkpoint.check_fits(serialization.to_state_dict(checkpoint_template(imported)),
                        serialization.to_state_dict(checkpoint_template(state)),
                        f"weights from {source}")
  run.describe(about=describe_experiment(config.experiment),
               architecture=describe(built.model, built.example_shape),
               data={"imported_from": str(source)},
               counts=param_counts(built.model, built.example_shape),
               metrics=metrics_lib.describe(built.metrics))
  files = RunFiles(run, background=False)
  files.start()  # config.json and an empty metrics.jsonl, as a training run's.
  files.close()
  meta = {**run.identity, "step": 0, "epoch": 0}
  checkpoint.save(run.step_checkpoint(0), checkpoint_template(imported), meta)
  link_atomic(run.step_checkpoint(0), run.best)
  summary = run.summarize("imported", last=run.step_checkpoint(0),
                          extra={"imported_from": str(source)})
  files.finish(summary)
  run.finish(summary, status="imported")
  return run
