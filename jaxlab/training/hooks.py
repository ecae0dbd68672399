"""Hooks: what a user adds to the epoch loop, called at fixed points after jaxlab's own work.

The loop (`jaxlab.training.train`) trains, evaluates and does each run's own work itself, in
order (`jaxlab.training.runfiles`: config.json, the metrics line, checkpoints, metrics.json,
the NaN check; then the stop on a signal). A `Hook` is for what comes on top, as Keras
callbacks and CLU's periodic actions are: it overrides the methods it needs, each called after
jaxlab's own work at that point, so that a hook sees an epoch already on disk:

  on_run_start(run)                   after set-up and resumption, before the first epoch
  on_epoch_start(epoch)
  on_chunk_end(steps, totals)         as each compiled call's metric sums reach the host
  wants_state(step) -> bool           at each step boundary inside an epoch: True asks for
  on_step_boundary(epoch, state, sums)  this call, with the state after global step `step`
  on_epoch_trained(epoch, state, sums)  after the epoch's last step, before its validation:
                                      the state and the epoch's sums
  on_epoch_end(epoch, record, state)  after validation; `record` is the metrics.jsonl line
  flush()                             before the final evaluation: finish pending writes
  written() -> bool                   waits for what it handed over to be on disk
  on_run_end(summary)                 after the final evaluation; `summary` is metrics.json
  close()                             always, last, also when the run fails or is interrupted

`run` is the `jaxlab.rundir.run.Run` being trained: its directory, settings, identity, position
and history (the loop appends each epoch's record before it calls `on_epoch_end`). A step
boundary is the end of a compiled call (`--steps_per_dispatch` steps); asking for the state
there costs one wait for the device, so hooks ask only when they need it. The states a hook
sees are host copies of its own, to keep. `Hooks` calls the hooks of every member of a group. jaxlab's own hooks
are the progress bar and the TensorBoard events.

TensorBoard event files are written with TensorBoard's own package (no TensorFlow), in the
layout of Keras's TensorBoard callback, so `tensorboard --logdir DIR` overlays train and
validation curves and compares every run under DIR:

  RUN/tensorboard/train/       epoch_loss, epoch_accuracy, epoch_<metric> for each metric of
                               the experiment's own, epoch_learning_rate, epoch_seconds
  RUN/tensorboard/validation/  epoch_loss, epoch_accuracy, epoch_<metric>

One point per epoch, at step = the epoch number (1, 2, ...) as in metrics.jsonl, with the
epoch's end as its wall time. The values are metrics.jsonl's: `epoch_loss` under train is
`train_loss` (data loss plus L2), under validation `val_loss`.

  RUN/tensorboard/             HParams: the run's settings (config.json's), and at its end
                               final/val_<metric> of each metric, final/best_val_accuracy

so that `tensorboard --logdir LAB` lists every run of a lab in its HParams tab, one row per run
with its settings and final metrics (summaries written by TensorBoard's own hparams plugin).
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.hparams import summary_v2 as hparams_summary
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from jaxlab.rundir.run import Run
from jaxlab.training.runfiles import epoch_line
from jaxlab.training.state import TrainState, member


class Hook:
  """A no-op at every point of the loop; subclasses override what they need.

  The states a hook is handed are its own, to keep (`reads_state = False`: a hook that never
  reads them, for which the loop need not copy them)."""

  run: Run
  reads_state = True

  def on_run_start(self, run: Run) -> None:
    self.run = run

  def on_epoch_start(self, epoch: int) -> None:
    pass

  def on_chunk_end(self, steps: int, totals: dict[str, float]) -> None:
    pass

  def wants_state(self, step: int) -> bool:
    return False

  def on_step_boundary(self, epoch: int, state: TrainState, sums: dict[str, Any]) -> None:
    pass

  def on_epoch_trained(self, epoch: int, state: TrainState, sums: dict[str, Any]) -> None:
    pass

  def on_epoch_end(self, epoch: int, record: dict[str, Any], state: TrainState) -> None:
    pass

  def flush(self) -> None:
    pass

  def written(self) -> bool:
    """Waits until what the hook has handed over is on disk; whether it is, without error (a
    stop in the middle of a validation ends the process once every hook says so)."""
    return True

  def on_run_end(self, summary: dict[str, Any]) -> None:
    pass

  def close(self) -> None:
    pass


class ProgressBar(Hook):
  """A per-epoch progress bar (tqdm on stderr) with the running loss and accuracy."""

  reads_state = False

  def __init__(self, enabled: bool):
    self.enabled = enabled
    self._bar = None

  def on_epoch_start(self, epoch: int) -> None:
    if self.enabled:
      from tqdm import tqdm
      self._bar = tqdm(total=self.run.steps_per_epoch,
                       desc=f"epoch {epoch}/{self.run.config.epochs}", unit="step",
                       file=sys.stderr, dynamic_ncols=True, leave=True)

  def on_chunk_end(self, steps: int, totals: dict[str, float]) -> None:
    if self._bar is not None:
      n = max(totals["count"], 1)
      self._bar.set_postfix(loss=f"{totals['loss'] / n:.4f}",
                            accuracy=f"{totals['accuracy'] / n:.4f}", refresh=False)
      self._bar.update(steps)

  def on_epoch_end(self, epoch: int, record: dict[str, Any], state: TrainState) -> None:
    if self._bar is not None:
      self._bar.set_postfix_str(epoch_line(record), refresh=False)
      self.close()

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None


class OnEpochEnd(Hook):
  """A function `fn(epoch, record, state)` called after every epoch, as a hook."""

  def __init__(self, fn: Callable[[int, dict[str, Any], TrainState], None]):
    self.fn = fn

  def on_epoch_end(self, epoch: int, record: dict[str, Any], state: TrainState) -> None:
    self.fn(epoch, record, state)


class Hooks:
  """The hooks of every member of a group, called position by position: the i-th hook of every
  member before the (i+1)-th of any. Per-member arguments are lists, one per member; states are
  the group's stacked state, already copied to the host, of which each hook sees its member's."""

  def __init__(self, runs: Sequence[Run], hooks: Sequence[Sequence[Hook]]):
    self.runs = list(runs)
    depth = max((len(h) for h in hooks), default=0)
    self.ordered = [(k, member_hooks[i]) for i in range(depth)
                    for k, member_hooks in enumerate(hooks) if i < len(member_hooks)]
    self._asking: list[tuple[int, Hook]] = []
    self._reads = any(hook.reads_state for _, hook in self.ordered)

  def own(self, host: TrainState) -> TrainState:
    """`host` (the loop's host copy, which the next copy overwrites) as the hooks may keep it:
    copied where a hook reads states."""
    return jax.tree_util.tree_map(np.copy, host) if self._reads else host

  def run_start(self) -> None:
    for k, hook in self.ordered:
      hook.on_run_start(self.runs[k])

  def epoch_start(self, epoch: int) -> None:
    for _, hook in self.ordered:
      hook.on_epoch_start(epoch)

  def chunk_end(self, steps: int, totals: Sequence[dict[str, Any]]) -> None:
    for k, hook in self.ordered:
      hook.on_chunk_end(steps, totals[k])

  def wants_state(self, step: int) -> bool:
    self._asking = [(k, hook) for k, hook in self.ordered if hook.wants_state(step)]
    return bool(self._asking)

  def step_boundary(self, epoch: int, host: TrainState,
                    totals: Sequence[dict[str, Any]]) -> None:
    """Only the hooks that asked (`wants_state`)."""
    if self._asking:
      host = self.own(host)
    for k, hook in self._asking:
      hook.on_step_boundary(epoch, member(host, k), totals[k])

  def epoch_trained(self, epoch: int, host: TrainState,
                    totals: Sequence[dict[str, Any]]) -> None:
    states = [member(host, k) for k in range(len(self.runs))]
    for k, hook in self.ordered:
      hook.on_epoch_trained(epoch, states[k], totals[k])

  def written(self) -> bool:
    return all([hook.written() for _, hook in self.ordered])

  def epoch_end(self, epoch: int, records: Sequence[dict[str, Any]], host: TrainState) -> None:
    states = [member(host, k) for k in range(len(self.runs))]
    for k, hook in self.ordered:
      hook.on_epoch_end(epoch, records[k], states[k])

  def flush(self) -> None:
    for _, hook in self.ordered:
      hook.flush()

  def run_end(self, summaries: Sequence[dict[str, Any]]) -> None:
    for k, hook in self.ordered:
      hook.on_run_end(summaries[k])

  def close(self) -> None:
    for _, hook in self.ordered:
      hook.close()


# ----------------------------------------------------------------------------- TensorBoard


def tags(metrics: Sequence[str]) -> dict[str, dict[str, str]]:
  """TensorBoard tag -> metrics.jsonl field, for each of the two event directories: every
  metric of the run (`jaxlab.metrics`) as Keras names them, `epoch_<name>`."""
  return {"train": {**{f"epoch_{m}": f"train_{m}" for m in metrics},
                    "epoch_learning_rate": "learning_rate", "epoch_seconds": "epoch_seconds"},
          "validation": {f"epoch_{m}": f"val_{m}" for m in metrics}}


def final_tags(metrics: Sequence[str]) -> dict[str, str]:
  """HParams metrics, written at the run's end: TensorBoard tag -> metrics.json field."""
  return {**{f"final/val_{m}": f"final_val_{m}" for m in metrics},
          "final/best_val_accuracy": "best_val_accuracy"}


def hparams(settings: dict[str, Any]) -> dict[str, Any]:
  """The settings as HParams values: numbers, strings and booleans as they are, anything else
  (a list, None) as its text."""
  return {k: v if isinstance(v, (bool, int, float, str)) else str(v)
          for k, v in sorted(settings.items())}


def scalar_event(tag: str, value: float, step: int, wall_time: float) -> event_pb2.Event:
  return event_pb2.Event(wall_time=wall_time, step=step, summary=summary_pb2.Summary(
      value=[summary_pb2.Summary.Value(tag=tag, simple_value=float(value))]))


class TensorBoard(Hook):
  """Writes each epoch's record as TensorBoard scalars.

  At every start the event files are written anew from the run's history (metrics.jsonl as
  kept on resume), so a resumed run holds each epoch exactly once: an epoch trained after the
  last checkpoint, and trained again after a crash, is not written twice, and none is lost."""

  reads_state = False

  def __init__(self):
    self._writers: dict[str, EventFileWriter] = {}

  def on_run_start(self, run: Run) -> None:
    super().on_run_start(run)
    self.close()
    self._tags = tags(run.metrics)
    for split in ("", *self._tags):
      directory = run.tensorboard / split
      directory.mkdir(parents=True, exist_ok=True)
      for old in directory.glob("events.out.tfevents.*"):
        old.unlink()
      self._writers[split] = EventFileWriter(str(directory))
    self._writers[""].add_event(event_pb2.Event(
        wall_time=time.time(), step=0,
        summary=hparams_summary.hparams_pb(hparams(run.settings))))
    for record in run.history:
      self._write(record)
    self._flush()

  def on_run_end(self, summary: dict[str, Any]) -> None:
    for tag, key in final_tags(self.run.metrics).items():
      if summary.get(key) is not None:
        self._writers[""].add_event(scalar_event(tag, summary[key],
                                                 summary.get("epochs_completed", 0), time.time()))
    self._flush()

  def _write(self, record: dict[str, Any]) -> None:
    wall_time = record.get("time", time.time())
    for split, names in self._tags.items():
      for tag, key in names.items():
        if record.get(key) is not None:
          self._writers[split].add_event(scalar_event(tag, record[key], record["epoch"],
                                                      wall_time))

  def _flush(self) -> None:
    for writer in self._writers.values():
      writer.flush()

  def on_epoch_end(self, epoch: int, record: dict[str, Any], state: TrainState) -> None:
    self._write(record)
    self._flush()

  def close(self) -> None:
    for writer in self._writers.values():
      writer.close()
    self._writers = {}
