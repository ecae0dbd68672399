"""Train states read back from run directories, for resuming and for evaluation.

A run's newest intact checkpoint, the newest step every member of a group has saved, and a
run's model and state for evaluation.

The state must fit the model exactly, name by name and shape by shape; the sums of the epoch
so far are read as they are, so a checkpoint written before a metric was added still resumes
(`jaxlab.metrics.restore_sums`). A damaged checkpoint falls back to the one before it; one of
another experiment, configuration or architecture is refused (`jaxlab.rundir.run.Run`).
"""

from __future__ import annotations

import pathlib
from typing import Any, Sequence

from absl import logging

from jaxlab import metrics as metrics_lib
from jaxlab.config import TrainConfig, validate
from jaxlab.errors import CheckpointError, CorruptCheckpoint
from jaxlab.experiment import get_experiment
from jaxlab.models import describe
from jaxlab.rundir.checkpoint import read, restore_state_dict
from jaxlab.rundir.run import RESTART_HINT, Run, step_of
from jaxlab.training.state import Setup, TrainState, create_train_state, member, setup, stack


def _restore(state_dict: dict[str, Any], template: TrainState, origin: str
             ) -> tuple[TrainState, dict[str, Any]]:
  """(state, saved sums) of a checkpoint's contents: the state checked against `template`,
  name by name and shape by shape; the sums as they were saved."""
  if not isinstance(state_dict, dict) or "state" not in state_dict:
    raise CheckpointError(f"{origin} does not fit: it has no 'state'")
  state = restore_state_dict({"state": state_dict["state"]}, {"state": template}, origin)
  return state["state"], dict(state_dict.get("sums") or {})


def restore_latest(run: Run, template: TrainState, max_step: int | None = None
                   ) -> tuple[TrainState, dict[str, Any], dict, pathlib.Path] | None:
  """(state, saved sums, meta, path) of the run's newest intact checkpoint (at `max_step` or
  before, if given), or None if there is none.

  A damaged checkpoint (truncated, bit-flipped) is reported and the one before it is used; one
  of another experiment, configuration or architecture is refused (`Run.check_checkpoint`)."""
  damaged = []
  for path in run.step_checkpoints():
    if max_step is not None and step_of(path) > max_step:
      continue
    try:
      meta, state_dict = read(path)
    except CorruptCheckpoint as e:
      logging.warning("%s; trying the checkpoint before it", e)
      damaged.append(str(e))
      continue
    run.check_checkpoint(meta, path)
    if damaged:
      logging.warning("Resuming from %s, the newest intact checkpoint", path)
    return (*_restore(state_dict, template, f"checkpoint {path}"), meta, path)
  if damaged:
    raise CheckpointError(f"no intact checkpoint in {run.checkpoints}: "
                          f"{'; '.join(damaged)}; {RESTART_HINT}")
  return None


def restore_group(runs: Sequence[Run], fresh: TrainState, metrics: metrics_lib.Table,
                  sharding: Any = None) -> tuple[TrainState, list[dict[str, Any]] | None]:
  """The members' newest intact checkpoints at one common step, stacked and placed by
  `sharding`, and the sums (of `metrics`) of that step's unfinished epoch (None at an epoch's
  end or for a fresh group, which gets `fresh`). A group resumes as a group: a member ahead of
  the others falls back to its checkpoint at their step; a member with no checkpoint starts
  fresh."""
  template = member(fresh, 0)
  target = None
  while True:
    found = [restore_latest(run, template, max_step=target) for run in runs]
    steps = [int(f[0].step) if f else 0 for f in found]
    if len(set(steps)) == 1:
      break
    target = min(steps)
  if not any(found):
    return fresh, None
  for run, f in zip(runs, found):
    if f:
      logging.info("Resuming %s from step %d (%s)", run.root, steps[0], f[3])
  states = [f[0] if f else member(fresh, k) for k, f in enumerate(found)]
  sums = []
  for run, f in zip(runs, found):
    restored, missing = metrics_lib.restore_sums(metrics, f[1]) if f else (None, [])
    if missing:
      logging.warning("%s: the checkpoint %s was written before the metric(s) %s: the epoch it "
                      "resumes records none of them", run.root, f[3], ", ".join(missing))
    sums.append(restored)
  return stack(states, sharding), sums if all(s is not None for s in sums) else None


def restore_state(run: Run, path: pathlib.Path, template: TrainState) -> tuple[TrainState, int]:
  """The train state of one checkpoint file of `run`, its identity checked, and its epoch."""
  meta, state_dict = read(path)
  run.check_checkpoint(meta, path)
  state, _ = _restore(state_dict, template, f"checkpoint {path}")
  return state, int(meta.get("epoch", 0))


def load_run(workdir: str | pathlib.Path,
             which: str = "best") -> tuple[TrainConfig, Setup, TrainState, int]:
  """(config, setup, train state, epoch) of a run directory's `which` checkpoint ("best", or
  "last": the newest intact one), checked against the experiment as it is declared now."""
  run = Run.open(workdir)
  config = run.config
  # An experiment of a user's lab file: load that file, so the name means what it meant (and
  # its data sets and optimizers are registered) before the settings are checked.
  get_experiment(config.experiment, run.about.get("declared_in"))
  validate(config)
  built = setup(config)
  run.describe(architecture=describe(built.model, built.example_shape))
  template = create_train_state(built, config.seed, config.learning_rate)
  if which == "last":
    found = restore_latest(run, template)
    if found is None:
      raise CheckpointError(f"no checkpoint in {run.checkpoints}")
    state, _, meta, _ = found
    return config, built, state, int(meta.get("epoch", 0))
  state, epoch = restore_state(run, run.checkpoint(which), template)
  return config, built, state, epoch
