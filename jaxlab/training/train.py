"""The epoch loop: set up or resume a group of runs, train and validate each epoch, finish.

  train_group(configs, workdirs)   K runs of one architecture as one vmapped state and program
  train_and_evaluate(config, dir)  one run: a group of one

The loop on one screen: `train_group` calls `_set_up` (the runs, their files and hooks, the
data, the model's compiled steps and the state, restored where a run was interrupted), `_epoch`
for each epoch, then `_finish`. Each epoch's order is a permutation drawn from (seed, epoch) and
each step's dropout key is `fold_in(rng, step)`, so a resumed run repeats exactly what an
uninterrupted one would have done. The compiled steps live in `jaxlab.training.steps`. At each
point of an epoch the loop does each run's own work itself, in order (`jaxlab.training.runfiles`:
files, checkpoints, the NaN check), then stops if a stop was requested; the hooks
(`jaxlab.training.hooks`: TensorBoard's, a user's) come after jaxlab's own work. A member is a
`jaxlab.rundir.run.Run`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import pathlib
import sys
import time
from typing import Any, Sequence

import jax
import numpy as np
from absl import logging

from jaxlab.rundir import checkpoint, lock
from jaxlab.training import parallel, process
from jaxlab import metrics as metrics_lib
from jaxlab.training.restore import restore_group, restore_state
from jaxlab.config import GROUP_SETTINGS, TrainConfig, changed_settings
from jaxlab.data import Dataset, load_dataset
from jaxlab.errors import BadValue, OutOfMemory
from jaxlab.experiment import describe_experiment
from jaxlab.training.hooks import Hook, Hooks, ProgressBar, TensorBoard
from jaxlab.training.runfiles import RunFiles
from jaxlab.models import describe, describe_precision
from jaxlab.optim import scheduled_learning_rate
from jaxlab.rundir.run import Run, best_record
from jaxlab.training.state import Setup, TrainState, create_group_state, epoch_keys, member, setup
from jaxlab.training.steps import Steps, evaluate, evaluate_group, make_steps, train_epoch
from jaxlab.inspection.summary import param_counts


def default_hooks(writer: bool = True) -> list[Hook]:
  """jaxlab's own hooks of every run, before a user's: the TensorBoard events (rewritten from
  metrics.jsonl at every start), in the process that writes (`parallel.is_writer`)."""
  return [TensorBoard()] if writer else []


def group_configs(config: TrainConfig, seeds: Sequence[int] | None = None,
                  learning_rates: Sequence[float] | None = None) -> list[TrainConfig]:
  """The members of a group: every (learning rate, seed) of the grid, `config` otherwise."""
  seeds = list(seeds) if seeds else [config.seed]
  rates = list(learning_rates) if learning_rates else [config.learning_rate]
  for name, values in (("seeds", seeds), ("learning_rates", rates)):
    if len(set(values)) != len(values):
      raise BadValue(f"--{name} lists a value twice: {values}")
  return [config.replace(seed=s, learning_rate=r) for r in rates for s in seeds]


def train_and_evaluate(config: TrainConfig, workdir: str | pathlib.Path,
                       dataset: Dataset | None = None, progress: bool | None = None,
                       hooks: Sequence[Hook] = (), restart: bool = False,
                       loop: str | None = None) -> dict[str, Any]:
  """Trains `config` into `workdir`, resuming from its newest intact checkpoint (at an epoch's
  end or inside an epoch), and returns the summary.

  `hooks` are called at every point of the loop after jaxlab's own work there (the run's files,
  checkpoints and checks, `jaxlab.training.runfiles`) and its own hooks (`default_hooks`). `progress`
  shows per-epoch bars (default: when stderr is a terminal). `restart` discards what the run
  directory holds and trains from scratch. `loop` is how a compiled call runs its steps
  (`jaxlab.training.steps.choose_loop`; default: a resumed run's own, else "auto").
  """
  return train_group([config], [workdir], dataset, progress, [hooks], restart, loop)[0]


def train_group(configs: Sequence[TrainConfig], workdirs: Sequence[str | pathlib.Path],
                dataset: Dataset | None = None, progress: bool | None = None,
                hooks: Sequence[Sequence[Hook]] | None = None,
                restart: bool = False, loop: str | None = None) -> list[dict[str, Any]]:
  """Trains K runs of one architecture that differ only in seed and learning rate as one
  vmapped state and program, run k into `workdirs[k]`, and returns their summaries.

  Each member's data order, initialization and dropout keys are those of the single run with
  its seed, so its results are those of `train_and_evaluate` up to float rounding. The group
  resumes as a group. `hooks[k]` are member k's own hooks (after jaxlab's own).
  """
  with contextlib.ExitStack() as held:  # Each run directory's lock (`jaxlab.rundir.lock`).
    group = _set_up(configs, workdirs, dataset, progress, hooks, restart, loop, held)
    try:
      for files in group.files:
        files.start()
      group.bar.on_run_start(group.runs[0])
      group.hooks.run_start()
      for epoch in range(group.runs[0].start_epoch + 1, group.config.epochs + 1):
        _epoch(group, epoch)
      return _finish(group)
    finally:
      try:
        for files in group.files:
          files.close()
      finally:
        group.bar.close()
        group.hooks.close()


@dataclasses.dataclass
class _Group:
  """A group in training: its runs, their files and hooks, the model and its compiled steps,
  the stacked state, and the data set (its arrays on the device(s))."""

  runs: list[Run]
  files: list[RunFiles]  # Each run's own work, called by the loop in order.
  bar: ProgressBar
  hooks: Hooks
  setup: Setup
  steps: Steps
  state: TrainState
  sums: list[dict[str, Any]] | None  # The unfinished epoch's sums, where it resumed inside one.
  template: TrainState  # A member's structure, to read a checkpoint into.
  dataset: Dataset
  arrays: tuple[jax.Array, ...]  # Train images and labels, test images and labels.
  seeds: list[int]
  started: process.Mark
  first_step: float | None = None  # When the first train step was done (Unix time).
  epoch: int = 0  # The epoch in training.
  copies: checkpoint.HostCopies = dataclasses.field(default_factory=checkpoint.HostCopies)
  # The validation of the state in memory (each member's metrics, predictions), once an epoch
  # has ended in this process: the final evaluation is the last epoch's.
  validation: tuple[list[dict[str, float]], np.ndarray] | None = None

  @property
  def config(self) -> TrainConfig:
    return self.runs[0].config

  def to_host(self, state: TrainState) -> TrainState:
    """The stacked state on the host, for the saves and the records: copied into the buffers
    of the copy before (`checkpoint.HostCopies`), once every save of that copy is written."""
    for files in self.files:
      files.flush()
    return self.copies.copy(state)

  def on_chunk(self, steps: int, totals: list[dict[str, Any]]) -> None:
    if self.first_step is None:
      self.first_step = time.time()
      process.first_step_done()
    self.bar.on_chunk_end(steps, totals[0])
    for k, files in enumerate(self.files):
      files.check_finite(self.epoch, totals[k])
    self.hooks.chunk_end(steps, totals)


def _set_up(configs: Sequence[TrainConfig], workdirs: Sequence[str | pathlib.Path],
            dataset: Dataset | None, progress: bool | None,
            extra_hooks: Sequence[Sequence[Hook]] | None, restart: bool, loop: str | None,
            held: contextlib.ExitStack) -> _Group:
  """Checks the group, prepares its directories, loads the data, builds the model and its
  steps, and restores the newest state every member has saved."""
  _check_group(configs, workdirs)
  started = process.mark()
  base = configs[0]
  mesh = parallel.data_mesh(base.num_devices)
  parallel.check_batch_size(base.batch_size, mesh)
  writer = parallel.is_writer()
  runs = [Run(w, c, label=pathlib.Path(w).name if len(configs) > 1 else "")
          for w, c in zip(workdirs, configs)]
  for run in runs:
    if writer:
      run.prepare()
      held.enter_context(lock.holding(run.root))  # One writer: a second process fails here.
      if restart:
        run.clear()
    if run.config_file.exists() and not restart:
      run.check_resume(run.config)
  parallel.sync("run directories ready")
  if dataset is None:
    dataset = load_dataset(base.dataset, data_dir=base.data_dir, download=base.download)
  elif dataset.info.name != base.dataset:
    raise ValueError(f"dataset {dataset.info.name!r} given for a config of {base.dataset!r}")
  dataset = dataset.limit_train(base.train_limit)
  rates = [c.learning_rate for c in configs]
  built = setup(base, dataset.info, rates)
  steps = make_steps(built, base.nan_policy, mesh, _loop(runs, loop))
  _describe(runs, built, dataset, {**process.environment(), "mesh": parallel.describe(mesh),
                                   "loop": steps.loop,
                                   "computes": describe_precision(built.model)})
  fresh = create_group_state(built, [c.seed for c in configs], rates, parallel.replicated(mesh))
  template = member(fresh, 0)  # Its own buffers: `fresh` may be trained (and donated).
  state, sums = restore_group(runs, fresh, built.metrics, parallel.replicated(mesh))
  # The step number is the position: epochs done, and steps into the next; a group resumes with
  # the epochs every member has validated (a member may have logged one more before a stop).
  step, per_epoch = int(state.step[0]), math.ceil(len(dataset.train_labels) / base.batch_size)
  done = min(run.validated_through(step, per_epoch) for run in runs)
  for run in runs:
    run.resume_at(step, per_epoch, done)
  show = sys.stderr.isatty() if progress is None else progress
  extra_hooks = extra_hooks or [()] * len(runs)
  hooks = Hooks(runs, [[*default_hooks(writer), *extra_hooks[k]] for k in range(len(runs))])
  files = [RunFiles(run, writer) for run in runs]
  bar = ProgressBar(show and writer)
  # The data set, as uint8, on every device; each device gathers its share of every batch.
  arrays = parallel.put_replicated((dataset.train_images, dataset.train_labels,
                                    dataset.test_images, dataset.test_labels), mesh)
  return _Group(runs, files, bar, hooks, built, steps, state, sums,
                template, dataset, arrays, [c.seed for c in configs], started)


def _loop(runs: Sequence[Run], loop: str | None) -> str | None:
  """`loop` where it is given (the scripts' --loop); else the loop a resumed run started with
  (so that it resumes bit for bit), or None (the choice for this model and backend) for a
  fresh run (or one restarted: its config.json is gone by now)."""
  if loop:
    return loop
  saved = Run.read(runs[0].root)
  return saved.environment.get("loop") if saved else None


def _check_group(configs: Sequence[TrainConfig], workdirs: Sequence[Any]) -> None:
  if not configs:
    raise ValueError("a group needs at least one run")
  if len(workdirs) != len(configs):
    raise ValueError(f"{len(configs)} runs but {len(workdirs)} run directories")
  base = configs[0].to_json()
  for config in configs[1:]:
    changed = [c for c in changed_settings(base, config.to_json())
               if c.split(":")[0] not in GROUP_SETTINGS]
    if changed:
      raise ValueError("the runs of a group may differ only in seed and learning rate, not in "
                       + ", ".join(changed))
  pairs = [(c.seed, c.learning_rate) for c in configs]
  if len(set(pairs)) != len(pairs):
    raise ValueError(f"a group holds each (seed, learning rate) once, got {pairs}")


def _describe(runs: Sequence[Run], built: Setup, dataset: Dataset,
              environment: dict[str, Any]) -> None:
  """What config.json says of each run, and its parameter counts."""
  counts = param_counts(built.model, built.example_shape)
  architecture = describe(built.model, built.example_shape)
  for run in runs:
    run.describe(about=describe_experiment(run.experiment), architecture=architecture,
                 data={"source": dataset.source, "train_examples": int(len(dataset.train_labels)),
                       "validation_examples": int(len(dataset.test_labels)),
                       **dataset.info.describe()},
                 environment=environment, counts=counts,
                 metrics=metrics_lib.describe(built.metrics))


def _epoch(group: _Group, epoch: int) -> None:
  """Trains every member one epoch (from where it resumed, in the first one), saves the state
  and the epoch's sums (safe before the validation), validates, and records the epoch; each
  run's own work first, then the hooks', then the stop where one was requested."""
  runs, config, hooks = group.runs, group.config, group.hooks
  train_images, train_labels, test_images, test_labels = group.arrays
  group.epoch = epoch
  group.bar.on_epoch_start(epoch)
  hooks.epoch_start(epoch)
  per_epoch = runs[0].steps_per_epoch
  first = (epoch - 1) * per_epoch  # The global number of its first step.
  offset = max(runs[0].start_step - first, 0)  # Steps of it done before a resume.
  trained = {}

  def wants_state(step: int) -> bool:
    hooks_ask = hooks.wants_state(step)  # Always asked: it notes which hooks want the state.
    return any([f.checkpoint_due(step) for f in group.files]) or _stop_requested() or hooks_ask

  def on_state(state: TrainState, totals: list[dict[str, Any]]) -> None:
    host = group.to_host(state)  # One host copy for every member.
    step = int(host.step[0])
    for k, files in enumerate(group.files):
      if files.checkpoint_due(step):
        files.save(member(host, k), totals[k], epoch - 1)
    hooks.step_boundary(epoch, host, totals)
    if _stop_requested():
      raise process.Preempted(
          f"stopped in epoch {epoch} after step {step - first} of {per_epoch} (global step "
          f"{step}); its checkpoint is {runs[0].step_checkpoint(step)}")

  def on_end(state: TrainState, totals: list[dict[str, Any]]) -> None:
    host = trained["host"] = group.to_host(state)  # The validation leaves it unchanged.
    for k, files in enumerate(group.files):
      files.epoch_trained(epoch, member(host, k), totals[k])
    trained["hooks"] = hooks.own(host)
    hooks.epoch_trained(epoch, trained["hooks"], totals)

  def written() -> bool:
    return all([*(files.written() for files in group.files), hooks.written()])

  t0 = time.perf_counter()
  try:
    group.state, train_metrics = train_epoch(
        group.steps, group.state, train_images, train_labels, config.batch_size,
        epoch_keys(group.seeds, epoch), config.steps_per_dispatch, group.on_chunk,
        first_step=first, start=offset, totals=group.sums if offset else None,
        wants_state=wants_state, on_state=on_state, on_end=on_end)
    t1 = time.perf_counter()
    host = trained["host"]
    step = int(host.step[0])
    where = (f"in the validation of epoch {epoch} (global step {step}); its checkpoint is "
             f"{runs[0].step_checkpoint(step)}, and the resumed run validates that epoch again")
    with process.exits_at_once(where, written):
      group.validation = evaluate_group(group.steps, group.state.variables, test_images,
                                        test_labels, config.eval_batch_size,
                                        interrupt=lambda: _stop_if_requested(where))
  except Exception as e:  # What does not fit: say so in words.
    full = _out_of_memory(e, config, len(runs), group.setup)
    if full is e:
      raise
    raise full from e
  t2 = time.perf_counter()
  records = []
  for k, run in enumerate(runs):
    train, val = dict(train_metrics[k]), group.validation[0][k]
    skipped = train.pop("skipped_steps")
    records.append({"epoch": epoch, "step": int(host.step[k]),
                    **{f"train_{name}": value for name, value in train.items()},
                    **{f"val_{name}": value for name, value in val.items()},
                    "skipped_steps": skipped,
                    "learning_rate": _learning_rate(member(host, k), run.config,
                                                    group.setup.injected),
                    "epoch_seconds": t1 - t0, "eval_seconds": t2 - t1, "time": time.time()})
    run.record_epoch(records[k])
  group.bar.on_epoch_end(epoch, records[0], member(host, 0))  # Closed before the log line.
  for k, files in enumerate(group.files):
    files.epoch_validated(epoch, records[k], int(host.step[k]))
  hooks.epoch_end(epoch, records, trained["hooks"])
  # Processes stop together, at an epoch's end, where they agree on it.
  if parallel.any_process(process.requested()):
    raise process.Preempted(f"stopped after epoch {epoch} (global step {step}); its checkpoint "
                            f"is {runs[0].step_checkpoint(step)}")


def _stop_requested() -> bool:
  """Whether to stop at this step boundary: a stop was requested, in a run of one process
  (processes of one run stop together, at an epoch's end: a signal reaches each at another
  moment, and they must all stop at the same step)."""
  return process.requested() and jax.process_count() == 1


def _stop_if_requested(where: str) -> None:
  """Raises `Preempted` where a stop was asked for (in one process: several stop together, at
  an epoch's end): the state of the epoch's end is saved, and its validation is done again."""
  if _stop_requested():
    raise process.Preempted(f"stopped {where}")


def _finish(group: _Group) -> list[dict[str, Any]]:
  """Waits for the last checkpoints, evaluates each member's final and best state, and hands
  the summaries (metrics.json) to the hooks."""
  for files in group.files:
    files.flush()
  group.hooks.flush()
  parallel.sync("checkpoints written")  # Every process reads the best checkpoint next.
  _, _, test_images, test_labels = group.arrays
  finals, predictions = group.validation or evaluate_group(
      group.steps, group.state.variables, test_images, test_labels, group.config.eval_batch_size)
  final_steps = [int(s) for s in jax.device_get(group.state.step)]
  startup = {**process.startup_report(group.started),
             "seconds_to_first_step": (group.first_step - group.started.time
                                       if group.first_step else None)}
  summaries = []
  for k, run in enumerate(group.runs):
    last = run.step_checkpoint(final_steps[k])
    evaluations = _final_evaluations(group, run, finals[k], predictions[k], last)
    summaries.append(run.summarize("completed", evaluations, last=last, extra={
        "startup": startup, "group": [str(r.root) for r in group.runs]}))
    run.finish(summaries[-1])
    group.files[k].finish(summaries[-1])
  logging.info("process %d of %d: final state fingerprint %s", jax.process_index(),
               jax.process_count(), checkpoint.fingerprint(group.to_host(group.state)))
  group.hooks.run_end(summaries)
  return summaries


def _final_evaluations(group: _Group, run: Run, final: dict[str, float],
                       predictions: np.ndarray, last: pathlib.Path) -> dict[str, Any]:
  """Evaluation reports of a member's final and best checkpoints on the validation split.

  The final state is the one in memory; the best one is read back only when it is another epoch
  (the best checkpoint is written on strict improvement: the first maximum)."""
  info = group.dataset.info

  def report(metrics: dict, predictions: np.ndarray, epoch: int,
             path: pathlib.Path) -> dict[str, Any]:
    return {"epoch": epoch, "split": "test", "checkpoint": str(path.relative_to(run.root)),
            **metrics_lib.report(group.dataset.test_labels, predictions, info.class_names,
                                metrics["loss"])}

  final_epoch = run.history[-1]["epoch"]
  best = best_record(run.history)
  evaluations = {"final": report(final, predictions, final_epoch, last)}
  if best is None or best["epoch"] == final_epoch:
    evaluations["best"] = {**evaluations["final"],
                           "checkpoint": str(run.best.relative_to(run.root))}
  else:
    state, epoch = restore_state(run, run.best, group.template)
    _, _, test_images, test_labels = group.arrays
    metrics, best_predictions = evaluate(group.steps, state.variables, test_images,
                                         test_labels, run.config.eval_batch_size)
    evaluations["best"] = report(metrics, best_predictions, epoch, run.best)
  return evaluations


def _learning_rate(state: TrainState, config: TrainConfig, injected: bool) -> float:
  """The learning rate of a member's last step: its optimizer's own schedule where it injects
  one (`jaxlab.optim.scheduled_learning_rate`), else its setting."""
  scheduled = scheduled_learning_rate(state.opt_state, injected)
  return config.learning_rate if scheduled is None else float(scheduled)


def _out_of_memory(error: Exception, config: TrainConfig, members: int,
                   built: Setup) -> Exception:
  """A clear error for what does not fit (XLA's runtime error of status RESOURCE_EXHAUSTED),
  instead of the allocator's trace: fewer members for a group, a smaller batch for a single
  run. Any other error is returned as it is."""
  text = str(error)
  if not (isinstance(error, jax.errors.JaxRuntimeError)
          and text.lstrip().startswith("RESOURCE_EXHAUSTED")):
    return error
  params = param_counts(built.model, built.example_shape)["total_params"]
  what = (f"{members} members of {params:,} parameters each" if members > 1 else
          f"a run of {params:,} parameters at batch size {config.batch_size}")
  advice = ("train fewer seeds or learning rates at once (see 'Many runs at once' in "
            "docs/guide/train.md)" if members > 1 else
            f"lower --batch_size (and --eval_batch_size, now {config.eval_batch_size})")
  return OutOfMemory(
      f"{what} do{'es' if members == 1 else ''} not fit in the memory of "
      f"{jax.devices()[0].device_kind}: {advice}; the allocator said: "
      f"{text.splitlines()[0][:200]}")
