"""The epoch loop: set up or resume a run, train and validate each epoch, evaluate at the end.

Design:
- The compiled steps live in `jaxlab.steps`, the train state in `jaxlab.state`; this module
  only sequences them. Each epoch's order is a permutation drawn from (seed, epoch) and each
  step's dropout key is `fold_in(rng, step)`, so a resumed run repeats exactly what an
  uninterrupted one would have done.
- Everything a run leaves behind (metrics lines, checkpoints, metrics.json, TensorBoard events,
  the progress bar) is a hook (`jaxlab.hooks`), called at fixed points of the loop.
"""

from __future__ import annotations

import math
import pathlib
import sys
import time
from typing import Any, Sequence

import jax
from absl import logging

from jaxlab import checkpoint, evaluation
from jaxlab.config import TrainConfig, build_model
from jaxlab.data import Dataset, load_dataset
from jaxlab.hooks import (Checkpoints, Hook, MetricsLog, NonFiniteGuard, ProgressBar, RunInfo,
                          StopOnSignal, SummaryFile)
from jaxlab.metrics import read_jsonl, write_jsonl
from jaxlab.optim import make_optimizer
from jaxlab.rundir import (RunDir, check_resume, checkpoint_meta, checkpoint_template,
                           restore_latest, write_config, write_summary)
from jaxlab.state import TrainState, create_train_state, seed_keys
from jaxlab.steps import Steps, evaluate, make_steps, train_epoch
from jaxlab.summary import summarize
from jaxlab.tensorboard import TensorBoard


def default_hooks(progress: bool) -> list[Hook]:
  """The hooks of every run, in order: the bar; the NaN check (before anything is saved); the
  metrics line before the checkpoint (lines after the checkpoint are dropped on resume); the
  stop on a signal after the checkpoint it needs; then metrics.json and the TensorBoard events
  (rewritten from metrics.jsonl at every start)."""
  return [ProgressBar(progress), NonFiniteGuard(), MetricsLog(), Checkpoints(), StopOnSignal(),
          SummaryFile(), TensorBoard()]


def _final_evaluations(run: RunDir, steps: Steps, state: TrainState, history: list[dict],
                       dataset: Dataset, test_images: jax.Array, test_labels: jax.Array,
                       batch_size: int) -> dict[str, Any]:
  """Evaluation reports of the final and the best checkpoint on the validation split.

  The in-memory state is the last checkpoint's; the best one is read back only when it is
  another epoch (the best checkpoint is written on strict improvement: the first maximum)."""
  final_epoch = history[-1]["epoch"]
  best_epoch = max(history, key=lambda r: r["val_accuracy"])["epoch"]

  def report(variables: dict, epoch: int, path: pathlib.Path) -> dict[str, Any]:
    metrics, predictions = evaluate(steps, variables, test_images, test_labels, batch_size)
    return {"epoch": epoch, "split": "test", "checkpoint": str(path.relative_to(run.root)),
            **evaluation.report(dataset.test_labels, predictions, dataset.info.class_names,
                                metrics["loss"])}

  evaluations = {"final": report(state.variables, final_epoch,
                                 run.step_checkpoint(int(state.step)))}
  if best_epoch == final_epoch:
    evaluations["best"] = {**evaluations["final"],
                           "checkpoint": str(run.best.relative_to(run.root))}
  else:
    meta, state_dict = checkpoint.read(run.best)
    restored = checkpoint.restore_state_dict(state_dict, checkpoint_template(state),
                                             f"checkpoint {run.best}")
    evaluations["best"] = report(restored["state"].variables, int(meta.get("epoch", best_epoch)),
                                 run.best)
  return evaluations


def train_and_evaluate(config: TrainConfig, workdir: str | pathlib.Path,
                       dataset: Dataset | None = None, progress: bool | None = None,
                       hooks: Sequence[Hook] = (), restart: bool = False) -> dict[str, Any]:
  """Trains `config` into `workdir`, resuming from its newest intact checkpoint (at an epoch's
  end or inside an epoch), and returns the summary.

  `hooks` run after the default ones (`default_hooks`) at every point of the loop. `progress`
  shows per-epoch bars (default: when stderr is a terminal). `restart` discards what the run
  directory holds and trains from scratch.
  """
  run = RunDir(workdir)
  run.prepare()
  if restart:
    run.clear()
  elif run.config.exists():
    check_resume(run, config)
  if dataset is None:
    dataset = load_dataset(config.dataset, data_dir=config.data_dir, download=config.download)
  elif dataset.info.name != config.dataset:
    raise ValueError(f"dataset {dataset.info.name!r} given for a config of {config.dataset!r}")
  dataset = dataset.limit_train(config.train_limit)

  model = build_model(config.experiment, dataset.info, config.precision)
  meta = checkpoint_meta(config, model)
  tx = make_optimizer(config.optimizer, config.learning_rate)
  state = create_train_state(model, tx, config.seed)
  sums = None
  found = restore_latest(run, checkpoint_template(state), meta)
  if found is not None:
    restored, _, path = found
    state = restored["state"]
    sums = {k: v.item() if hasattr(v, "item") else v for k, v in restored["sums"].items()}
    logging.info("Resuming %s from step %d (%s)", run.root, int(state.step), path)
  write_config(run, config, model, {"source": dataset.source,
                                    "train_examples": int(len(dataset.train_labels)),
                                    "validation_examples": int(len(dataset.test_labels))})
  # The step number is the position: the epochs done and the steps done in the next one.
  steps_per_epoch = math.ceil(len(dataset.train_labels) / config.batch_size)
  start_step = int(state.step)
  start_epoch, offset = divmod(start_step, steps_per_epoch)
  # Epochs after the checkpoint (a crash between the metrics line and the checkpoint) rerun.
  history = [r for r in read_jsonl(run.metrics_jsonl) if r["epoch"] <= start_epoch]
  write_jsonl(run.metrics_jsonl, history)

  steps = make_steps(model, config.nan_policy)
  train_images, train_labels = jax.device_put(dataset.train_images), jax.device_put(
      dataset.train_labels)
  test_images, test_labels = jax.device_put(dataset.test_images), jax.device_put(
      dataset.test_labels)
  _, _, shuffle_key = seed_keys(config.seed)
  counts = summarize(model)
  info = RunInfo(run, config, history, start_epoch, steps_per_epoch,
                 {k: counts[k] for k in ("total_params", "trainable_params",
                                         "non_trainable_params")}, start_step, meta)
  show = sys.stderr.isatty() if progress is None else progress
  hooks = [*default_hooks(show), *hooks]
  try:
    for hook in hooks:
      hook.on_run_start(info)

    def on_chunk(n: int, totals: dict[str, Any]) -> None:
      for hook in hooks:
        hook.on_chunk_end(n, totals)

    asking: list[Hook] = []

    def wants_state(step: int) -> bool:
      asking[:] = [hook for hook in hooks if hook.wants_state(step)]
      return bool(asking)

    for epoch in range(start_epoch + 1, config.epochs + 1):
      for hook in hooks:
        hook.on_epoch_start(epoch)
      resumed_inside = epoch == start_epoch + 1 and offset > 0

      def on_state(state: TrainState, totals: dict[str, Any], epoch: int = epoch) -> None:
        for hook in asking:  # Only the hooks that asked for this boundary.
          hook.on_step_boundary(epoch, state, totals)

      t0 = time.perf_counter()
      state, train_metrics = train_epoch(
          steps, state, train_images, train_labels, config.batch_size,
          jax.random.fold_in(shuffle_key, epoch), config.steps_per_dispatch, on_chunk,
          first_step=(epoch - 1) * steps_per_epoch, start=offset if resumed_inside else 0,
          totals=sums if resumed_inside else None, wants_state=wants_state, on_state=on_state)
      t1 = time.perf_counter()
      val_metrics, _ = evaluate(steps, state.variables, test_images, test_labels,
                                config.eval_batch_size)
      t2 = time.perf_counter()
      record = {"epoch": epoch, "step": int(state.step),
                "train_loss": train_metrics["loss"],
                "train_data_loss": train_metrics["data_loss"],
                "train_l2_loss": train_metrics["l2_loss"],
                "train_accuracy": train_metrics["accuracy"],
                "val_loss": val_metrics["loss"], "val_accuracy": val_metrics["accuracy"],
                "skipped_steps": train_metrics["skipped_steps"],
                "learning_rate": config.learning_rate,
                "epoch_seconds": t1 - t0, "eval_seconds": t2 - t1, "time": time.time()}
      history.append(record)
      for hook in hooks:
        hook.on_epoch_end(epoch, record, state)

    for hook in hooks:
      hook.flush()
    evaluations = _final_evaluations(run, steps, state, history, dataset, test_images,
                                     test_labels, config.eval_batch_size)
    summary = write_summary(run, config, history, info.counts, "completed", evaluations,
                            last=run.step_checkpoint(int(state.step)))
    for hook in hooks:
      hook.on_run_end(summary)
    return summary
  finally:
    for hook in hooks:
      hook.close()
