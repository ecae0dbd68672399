"""Train states from run directories: a run's newest checkpoint, a group's, one to evaluate.

The newest intact checkpoint of a run, the newest step every member of a group has saved, and
a run's model and state read back for evaluation.

Beside `jaxlab.state`, which makes the states these rebuild. A checkpoint holds the train state
and the metric sums of the unfinished epoch (`checkpoint_template`); its position is the
state's step number.
"""

from __future__ import annotations

import pathlib
from typing import Any, Sequence

from absl import logging

from jaxlab import checkpoint
from jaxlab.config import TrainConfig, validate
from jaxlab.experiment import build_model, get_experiment
from jaxlab.models import PlanModel, describe
from jaxlab.optim import make_optimizer
from jaxlab.run import RESTART_HINT, Run, step_of
from jaxlab.state import TrainState, create_train_state, member, stack, train_sums_zeros


def checkpoint_template(state: Any) -> dict[str, Any]:
  """The structure a checkpoint holds: the train state, and the metric sums of the steps of an
  unfinished epoch (all zero at an epoch's end)."""
  return {"state": state, "sums": train_sums_zeros()}


def restore_latest(run: Run, template: Any,
                   max_step: int | None = None) -> tuple[Any, dict, pathlib.Path] | None:
  """(restored target, meta, path) of the run's newest intact checkpoint (at `max_step` or
  before, if given), or None if there is none.

  A damaged checkpoint (truncated, bit-flipped) is reported and the one before it is used; one
  of another experiment, configuration or architecture is refused (`Run.check_checkpoint`)."""
  damaged = []
  for path in run.step_checkpoints():
    if max_step is not None and step_of(path) > max_step:
      continue
    try:
      meta, state_dict = checkpoint.read(path)
    except checkpoint.CorruptCheckpoint as e:
      logging.warning("%s; trying the checkpoint before it", e)
      damaged.append(str(e))
      continue
    run.check_checkpoint(meta, path)
    if damaged:
      logging.warning("Resuming from %s, the newest intact checkpoint", path)
    return checkpoint.restore_state_dict(state_dict, template, f"checkpoint {path}"), meta, path
  if damaged:
    raise checkpoint.CheckpointError(f"no intact checkpoint in {run.checkpoints}: "
                                     f"{'; '.join(damaged)}; {RESTART_HINT}")
  return None


def restore_group(runs: Sequence[Run], fresh: TrainState, sharding: Any = None
                  ) -> tuple[TrainState, list[dict[str, Any]] | None]:
  """The members' newest intact checkpoints at one common step, stacked and placed by
  `sharding`, and the sums of that step's unfinished epoch (None at an epoch's end or for a
  fresh group, which gets `fresh`). A group resumes as a group: a member ahead of the others
  falls back to its checkpoint at their step; a member with no checkpoint starts fresh."""
  template = checkpoint_template(member(fresh, 0))
  target = None
  while True:
    found = [restore_latest(run, template, max_step=target) for run in runs]
    steps = [int(f[0]["state"].step) if f else 0 for f in found]
    if len(set(steps)) == 1:
      break
    target = min(steps)
  if not any(found):
    return fresh, None
  for run, f in zip(runs, found):
    if f:
      logging.info("Resuming %s from step %d (%s)", run.root, steps[0], f[2])
  states = [f[0]["state"] if f else member(fresh, k) for k, f in enumerate(found)]
  sums = [{key: v.item() if hasattr(v, "item") else v for key, v in f[0]["sums"].items()}
          if f else None for f in found]
  return stack(states, sharding), sums if all(s is not None for s in sums) else None


def restore_state(run: Run, path: pathlib.Path, template: TrainState) -> tuple[TrainState, int]:
  """The train state of one checkpoint file of `run`, its identity checked, and its epoch."""
  meta, state_dict = checkpoint.read(path)
  run.check_checkpoint(meta, path)
  restored = checkpoint.restore_state_dict(state_dict, checkpoint_template(template),
                                           f"checkpoint {path}")
  return restored["state"], int(meta.get("epoch", 0))


def load_run(workdir: str | pathlib.Path,
             which: str = "best") -> tuple[TrainConfig, PlanModel, TrainState, int]:
  """(config, model, train state, epoch) of a run directory's `which` checkpoint ("best", or
  "last": the newest intact one), checked against the experiment as it is declared now."""
  run = Run.open(workdir)
  config = run.config
  validate(config)
  # An experiment of a user's lab file: load that file, so the name means what it meant.
  get_experiment(config.experiment, run.about.get("declared_in"))
  model = build_model(config.experiment, config.dataset, config.precision)
  run.describe(architecture=describe(model))
  template = create_train_state(model, make_optimizer(config.optimizer), config.seed,
                                config.learning_rate)
  if which == "last":
    found = restore_latest(run, checkpoint_template(template))
    if found is None:
      raise checkpoint.CheckpointError(f"no checkpoint in {run.checkpoints}")
    restored, meta, _ = found
    return config, model, restored["state"], int(meta.get("epoch", 0))
  state, epoch = restore_state(run, run.checkpoint(which), template)
  return config, model, state, epoch
