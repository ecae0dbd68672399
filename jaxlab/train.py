"""The epoch loop: set up or resume runs, train and validate each epoch, evaluate at the end.

Design:
- The compiled steps live in `jaxlab.steps`, the train state in `jaxlab.state`; this module
  only sequences them. Each epoch's order is a permutation drawn from (seed, epoch) and each
  step's dropout key is `fold_in(rng, step)`, so a resumed run repeats exactly what an
  uninterrupted one would have done.
- The loop trains a group: K runs of one architecture that differ only in seed and learning
  rate, as one stacked state and one vmapped program (`train_group`). A single run is a group
  of one (`train_and_evaluate`). Each member is an ordinary run directory.
- Everything a run leaves behind (metrics lines, checkpoints, metrics.json, TensorBoard events,
  the progress bar) is a hook (`jaxlab.hooks`), called at fixed points of the loop, one list of
  hooks per member.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jax.sharding import Mesh

from jaxlab import checkpoint, evaluation, parallel, runtime
from jaxlab.config import TrainConfig, build_model, changed_settings
from jaxlab.data import Dataset, load_dataset
from jaxlab.hooks import (Checkpoints, Hook, MetricsLog, NonFiniteGuard, ProgressBar, RunInfo,
                          StopOnSignal, SummaryFile)
from jaxlab.metrics import read_jsonl, write_jsonl
from jaxlab.models import PlanModel
from jaxlab.optim import make_optimizer
from jaxlab.rundir import (RunDir, check_resume, checkpoint_meta, checkpoint_template,
                           restore_latest, summary_dict, write_config, write_summary)
from jaxlab.state import TrainState, create_group_state, member, seed_keys, stack
from jaxlab.steps import Steps, evaluate, evaluate_group, make_steps, train_epoch
from jaxlab.summary import summarize
from jaxlab.tensorboard import TensorBoard

GROUP_SETTINGS = ("seed", "learning_rate")  # What the members of a group may differ in.


def default_hooks(progress: bool, writer: bool = True) -> list[Hook]:
  """The hooks of every run, in order: the bar; the NaN check (before anything is saved); the
  metrics line before the checkpoint (lines after the checkpoint are dropped on resume); the
  stop on a signal after the checkpoint it needs; then metrics.json and the TensorBoard events
  (rewritten from metrics.jsonl at every start). A process that is not the writer of a
  multi-process run (`parallel.is_writer`) keeps the two that write nothing."""
  if not writer:
    return [NonFiniteGuard(), StopOnSignal()]
  return [ProgressBar(progress), NonFiniteGuard(), MetricsLog(), Checkpoints(), StopOnSignal(),
          SummaryFile(), TensorBoard()]


def group_configs(config: TrainConfig, seeds: Sequence[int] | None = None,
                  learning_rates: Sequence[float] | None = None) -> list[TrainConfig]:
  """The members of a group: every (learning rate, seed) of the grid, `config` otherwise."""
  seeds = list(seeds) if seeds else [config.seed]
  rates = list(learning_rates) if learning_rates else [config.learning_rate]
  for name, values in (("seeds", seeds), ("learning_rates", rates)):
    if len(set(values)) != len(values):
      raise ValueError(f"--{name} lists a value twice: {values}")
  configs = [dataclasses.replace(config, seed=s, learning_rate=r) for r in rates for s in seeds]
  for c in configs:
    if not (c.learning_rate > 0 and math.isfinite(c.learning_rate)):
      raise ValueError(f"learning_rate must be a positive number, got {c.learning_rate!r}")
  return configs


def member_dir(workdir: str | pathlib.Path, config: TrainConfig, by_seed: bool,
               by_rate: bool) -> pathlib.Path:
  """WORKDIR/seed_S, WORKDIR/lr_R or WORKDIR/lr_R/seed_S, for a group over seeds, learning rates
  or both."""
  path = pathlib.Path(workdir)
  if by_rate:
    path = path / f"lr_{config.learning_rate:g}"
  return path / f"seed_{config.seed}" if by_seed else path


@dataclasses.dataclass
class _Member:
  """One run of a group: its settings, directory, checkpoint identity and hooks."""

  config: TrainConfig
  run: RunDir
  meta: dict[str, Any]
  hooks: list[Hook]
  info: RunInfo | None = None


def _by_position(members: list[_Member]) -> list[tuple[int, Hook]]:
  """(member, hook) of every member's hooks, position by position: the i-th hook of every
  member runs before the (i+1)-th of any, so that every member has saved its checkpoint before
  one member's StopOnSignal stops the group."""
  depth = max(len(m.hooks) for m in members)
  return [(k, m.hooks[i]) for i in range(depth) for k, m in enumerate(members)
          if i < len(m.hooks)]


def _check_group(configs: Sequence[TrainConfig]) -> None:
  if not configs:
    raise ValueError("a group needs at least one run")
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


def _restore_group(members: list[_Member], template: TrainState, fresh: TrainState,
                   mesh: Mesh) -> tuple[TrainState, list[dict[str, Any]] | None]:
  """The members' newest intact checkpoints at one common step (a group resumes as a group:
  a member ahead of the others falls back to its checkpoint at their step), stacked."""
  target = None
  while True:
    found = [restore_latest(m.run, checkpoint_template(template), m.meta, max_step=target)
             for m in members]
    steps = [int(f[0]["state"].step) if f else 0 for f in found]
    if len(set(steps)) == 1:
      break
    target = min(steps)
  if not any(found):
    return fresh, None
  for m, f in zip(members, found):
    if f:
      logging.info("Resuming %s from step %d (%s)", m.run.root, steps[0], f[2])
  states = [f[0]["state"] if f else member(fresh, k) for k, f in enumerate(found)]
  sums = [{key: v.item() if hasattr(v, "item") else v for key, v in f[0]["sums"].items()}
          if f else None for f in found]
  return (stack(states, parallel.replicated(mesh)),
          sums if all(s is not None for s in sums) else None)


def _final_evaluations(m: _Member, steps: Steps, history: list[dict], final: dict[str, float],
                       predictions: np.ndarray, final_step: int, template: TrainState,
                       dataset: Dataset, test_images: jax.Array, test_labels: jax.Array
                       ) -> dict[str, Any]:
  """Evaluation reports of a member's final and best checkpoints on the validation split.

  The final state is the one in memory; the best one is read back only when it is another epoch
  (the best checkpoint is written on strict improvement: the first maximum)."""
  run = m.run

  def report(metrics: dict, predictions: np.ndarray, epoch: int,
             path: pathlib.Path) -> dict[str, Any]:
    return {"epoch": epoch, "split": "test", "checkpoint": str(path.relative_to(run.root)),
            **evaluation.report(dataset.test_labels, predictions, dataset.info.class_names,
                                metrics["loss"])}

  final_epoch = history[-1]["epoch"]
  best_epoch = max(history, key=lambda r: r["val_accuracy"])["epoch"]
  evaluations = {"final": report(final, predictions, final_epoch,
                                 run.step_checkpoint(final_step))}
  if best_epoch == final_epoch:
    evaluations["best"] = {**evaluations["final"],
                           "checkpoint": str(run.best.relative_to(run.root))}
  else:
    meta, state_dict = checkpoint.read(run.best)
    restored = checkpoint.restore_state_dict(state_dict, checkpoint_template(template),
                                             f"checkpoint {run.best}")
    metrics, best_predictions = evaluate(steps, restored["state"].variables, test_images,
                                         test_labels, m.config.eval_batch_size)
    evaluations["best"] = report(metrics, best_predictions, int(meta.get("epoch", best_epoch)),
                                 run.best)
  return evaluations


def _out_of_memory(error: Exception, members: int, model: PlanModel) -> Exception:
  """A clear error for K members that do not fit, instead of the allocator's trace."""
  text = str(error)
  if "RESOURCE_EXHAUSTED" not in text and "out of memory" not in text.lower():
    return error
  params = summarize(model)["total_params"]
  return MemoryError(
      f"{members} members of {params:,} parameters each do not fit in the memory of "
      f"{jax.devices()[0].device_kind}: train fewer seeds or learning rates at once (see "
      f"'Many runs at once' in the README); the allocator said: {text.splitlines()[0][:200]}")


def train_and_evaluate(config: TrainConfig, workdir: str | pathlib.Path,
                       dataset: Dataset | None = None, progress: bool | None = None,
                       hooks: Sequence[Hook] = (), restart: bool = False) -> dict[str, Any]:
  """Trains `config` into `workdir`, resuming from its newest intact checkpoint (at an epoch's
  end or inside an epoch), and returns the summary.

  `hooks` run after the default ones (`default_hooks`) at every point of the loop. `progress`
  shows per-epoch bars (default: when stderr is a terminal). `restart` discards what the run
  directory holds and trains from scratch.
  """
  return train_group([config], [workdir], dataset, progress, [hooks], restart)[0]


def train_group(configs: Sequence[TrainConfig], workdirs: Sequence[str | pathlib.Path],
                dataset: Dataset | None = None, progress: bool | None = None,
                hooks: Sequence[Sequence[Hook]] | None = None,
                restart: bool = False) -> list[dict[str, Any]]:
  """Trains K runs of one architecture that differ only in seed and learning rate as one
  vmapped state and program, run k into `workdirs[k]`, and returns their summaries.

  Each member's data order, initialization and dropout keys are those of the single run with
  its seed, so its results are those of `train_and_evaluate` up to float rounding. The group
  resumes as a group. `hooks[k]` are member k's own hooks (after the default ones).
  """
  _check_group(configs)
  started = runtime.mark()
  base = configs[0]
  mesh = parallel.data_mesh(base.num_devices)
  parallel.check_batch_size(base.batch_size, mesh)
  writer = parallel.is_writer()
  runs = [RunDir(w) for w in workdirs]
  if len(runs) != len(configs):
    raise ValueError(f"{len(configs)} runs but {len(runs)} run directories")
  for run, config in zip(runs, configs):
    if writer:
      run.prepare()
      if restart:
        run.clear()
    if run.config.exists() and not restart:
      check_resume(run, config)
  parallel.sync("run directories ready")
  if dataset is None:
    dataset = load_dataset(base.dataset, data_dir=base.data_dir, download=base.download)
  elif dataset.info.name != base.dataset:
    raise ValueError(f"dataset {dataset.info.name!r} given for a config of {base.dataset!r}")
  dataset = dataset.limit_train(base.train_limit)

  model = build_model(base.experiment, dataset.info, base.precision)
  tx = make_optimizer(base.optimizer)
  show = sys.stderr.isatty() if progress is None else progress
  hooks = hooks or [()] * len(configs)
  members = [_Member(config, run, checkpoint_meta(config, model),
                     [*default_hooks(show and k == 0, writer), *hooks[k]])
             for k, (config, run) in enumerate(zip(configs, runs))]
  fresh = create_group_state(model, tx, [c.seed for c in configs],
                             [c.learning_rate for c in configs], parallel.replicated(mesh))
  template = member(fresh, 0)  # A member's structure (its own buffers: `fresh` is donated).
  state, sums = _restore_group(members, template, fresh, mesh)
  data_info = {"source": dataset.source, "train_examples": int(len(dataset.train_labels)),
               "validation_examples": int(len(dataset.test_labels))}
  if writer:
    for m in members:
      write_config(m.run, m.config, model, data_info, parallel.describe(mesh))
  # The step number is the position: the epochs done and the steps done in the next one.
  steps_per_epoch = math.ceil(len(dataset.train_labels) / base.batch_size)
  start_step = int(state.step[0])
  start_epoch, offset = divmod(start_step, steps_per_epoch)
  counts = summarize(model)
  counts = {k: counts[k] for k in ("total_params", "trainable_params", "non_trainable_params")}
  for m in members:
    # Epochs after the checkpoint (a crash between the metrics line and the checkpoint) rerun.
    history = [r for r in read_jsonl(m.run.metrics_jsonl) if r["epoch"] <= start_epoch]
    if writer:
      write_jsonl(m.run.metrics_jsonl, history)
    m.info = RunInfo(m.run, m.config, history, start_epoch, steps_per_epoch, counts, start_step,
                     m.meta, label=m.run.root.name if len(members) > 1 else "")

  steps = make_steps(model, base.nan_policy, mesh)
  # The data set, as uint8, on every device; each device gathers its share of every batch.
  train_images, train_labels, test_images, test_labels = parallel.put_replicated(
      (dataset.train_images, dataset.train_labels, dataset.test_images, dataset.test_labels),
      mesh)
  shuffle_keys = jnp.stack([seed_keys(c.seed)[2] for c in configs])
  ordered = _by_position(members)
  try:
    for k, hook in ordered:
      hook.on_run_start(members[k].info)

    first_step: list[float] = []

    def on_chunk(n: int, totals: list[dict[str, Any]]) -> None:
      if not first_step:
        first_step.append(time.time())
        runtime.first_step_done()
      for k, hook in ordered:
        hook.on_chunk_end(n, totals[k])

    asking: list[tuple[int, Hook]] = []

    def wants_state(step: int) -> bool:
      asking[:] = [(k, hook) for k, hook in ordered if hook.wants_state(step)]
      return bool(asking)

    for epoch in range(start_epoch + 1, base.epochs + 1):
      for _, hook in ordered:
        hook.on_epoch_start(epoch)
      resumed_inside = epoch == start_epoch + 1 and offset > 0

      def on_state(state: TrainState, totals: list[dict[str, Any]], epoch: int = epoch) -> None:
        host = checkpoint.to_host(state)  # One copy for every member's hooks.
        for k, hook in asking:  # Only the hooks that asked for this boundary.
          hook.on_step_boundary(epoch, member(host, k), totals[k])

      t0 = time.perf_counter()
      try:
        state, train_metrics = train_epoch(
            steps, state, train_images, train_labels, base.batch_size,
            jax.vmap(jax.random.fold_in, in_axes=(0, None))(shuffle_keys, epoch),
            base.steps_per_dispatch, on_chunk, first_step=(epoch - 1) * steps_per_epoch,
            start=offset if resumed_inside else 0, totals=sums if resumed_inside else None,
            wants_state=wants_state, on_state=on_state)
        t1 = time.perf_counter()
        val_metrics, _ = evaluate_group(steps, state.variables, test_images, test_labels,
                                        base.eval_batch_size)
      except Exception as e:  # K members that do not fit: say so in words.
        raise _out_of_memory(e, len(members), model) from e
      t2 = time.perf_counter()
      host = checkpoint.to_host(state)
      records = []
      for k, m in enumerate(members):
        train, val = train_metrics[k], val_metrics[k]
        records.append({"epoch": epoch, "step": int(host.step[k]),
                        "train_loss": train["loss"], "train_data_loss": train["data_loss"],
                        "train_l2_loss": train["l2_loss"], "train_accuracy": train["accuracy"],
                        "val_loss": val["loss"], "val_accuracy": val["accuracy"],
                        "skipped_steps": train["skipped_steps"],
                        "learning_rate": m.config.learning_rate,
                        "epoch_seconds": t1 - t0, "eval_seconds": t2 - t1, "time": time.time()})
        m.info.history.append(records[k])
      states = [member(host, k) for k in range(len(members))]
      for k, hook in ordered:
        hook.on_epoch_end(epoch, records[k], states[k])

    for _, hook in ordered:
      hook.flush()
    parallel.sync("checkpoints written")  # Every process reads the best checkpoint next.
    finals, predictions = evaluate_group(steps, state.variables, test_images, test_labels,
                                         base.eval_batch_size)
    final_steps = [int(s) for s in jax.device_get(state.step)]
    startup = {**runtime.startup_report(started),
               "seconds_to_first_step": first_step[0] - started.time if first_step else None}
    summaries = []
    for k, m in enumerate(members):
      evaluations = _final_evaluations(m, steps, m.info.history, finals[k], predictions[k],
                                       final_steps[k], template, dataset, test_images,
                                       test_labels)
      summary_args = (m.run, m.config, m.info.history, counts, "completed", evaluations)
      extra = {"startup": startup, "group": [str(o.run.root) for o in members]}
      last = m.run.step_checkpoint(final_steps[k])
      summaries.append(write_summary(*summary_args, last=last, extra=extra) if writer
                       else summary_dict(*summary_args, last=last, extra=extra))
    logging.info("process %d of %d: final state fingerprint %s", jax.process_index(),
                 jax.process_count(), checkpoint.fingerprint(checkpoint.to_host(state)))
    for k, hook in ordered:
      hook.on_run_end(summaries[k])
    return summaries
  finally:
    for _, hook in ordered:
      hook.close()
