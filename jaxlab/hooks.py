"""What a training run leaves behind, as small objects the epoch loop calls at fixed points.

The loop (`jaxlab.train`) only trains and evaluates; every file a run leaves behind
(config.json, the metrics lines, checkpoints, metrics.json, TensorBoard events) and the
progress bar are a `Hook`, as Keras callbacks and CLU's periodic actions are. A hook overrides
the methods it needs:

  on_run_start(run)                   after set-up and resumption, before the first epoch
  on_epoch_start(epoch)
  on_chunk_end(steps, totals)         as each compiled call's metric sums reach the host
  wants_state(step) -> bool           at each step boundary inside an epoch: True asks for
  on_step_boundary(epoch, state, sums)  this call, with the state after global step `step`
  on_epoch_trained(epoch, state, sums)  after the epoch's last step, before its validation:
                                      the state and the epoch's sums
  on_epoch_end(epoch, record, state)  after validation; `record` is the metrics.jsonl line
  flush()                             before the final evaluation: finish pending writes
  on_run_end(summary)                 after the final evaluation; `summary` is metrics.json
  close()                             always, last, also when the run fails or is interrupted

`run` is the `jaxlab.run.Run` being trained: its directory, settings, identity, position and
history (the loop appends each epoch's record before it calls `on_epoch_end`). A step boundary
is the end of a compiled call (`--steps_per_dispatch` steps); asking for the state there costs
one wait for the device, so hooks ask only when they need it.

Hooks run in list order; `jaxlab.train.default_hooks` puts the files first, so a later hook (a
user's) sees an epoch already on disk. `Hooks` calls the hooks of every member of a group.

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
from absl import logging
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.hparams import summary_v2 as hparams_summary
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from jaxlab import checkpoint, parallel, runtime
from jaxlab.errors import NonFiniteError
from jaxlab.files import append_jsonl, write_json, write_jsonl
from jaxlab.run import BEST_ON, Run, best_record
from jaxlab.state import TrainState, member


class Hook:
  """A no-op at every point of the loop; subclasses override what they need."""

  run: Run

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


def epoch_line(record: dict[str, Any]) -> str:
  """The record in one line; a mean of no steps (all skipped) shows as `-`."""
  fields = (("loss", "train_loss"), ("accuracy", "train_accuracy"), ("val_loss", "val_loss"),
            ("val_accuracy", "val_accuracy"))
  line = " ".join(f"{name}={record[key]:.4f}" if record[key] is not None else f"{name}=-"
                  for name, key in fields)
  return line + (f" skipped_steps={record['skipped_steps']}" if record.get("skipped_steps")
                 else "")


class ProgressBar(Hook):
  """A per-epoch progress bar (tqdm on stderr) with the running loss and accuracy."""

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


class ConfigFile(Hook):
  """Writes config.json at the start: the settings, where the experiment comes from, the layer
  plan, the data and the environment (`Run.description`)."""

  def on_run_start(self, run: Run) -> None:
    super().on_run_start(run)
    write_json(run.config_file, run.description())


class MetricsLog(Hook):
  """Keeps metrics.jsonl to the run's history: rewritten at the start (a resumed run drops the
  epochs after its checkpoint, which it trains again), then each epoch's record appended
  (fsynced) and logged."""

  def on_run_start(self, run: Run) -> None:
    super().on_run_start(run)
    write_jsonl(run.metrics_jsonl, run.history)

  def on_epoch_end(self, epoch: int, record: dict[str, Any], state: TrainState) -> None:
    label = f"{self.run.label} " if self.run.label else ""
    logging.info("%sepoch %d/%d: %s | %.1f s", label, epoch, self.run.config.epochs,
                 epoch_line(record), record["epoch_seconds"])
    append_jsonl(self.run.metrics_jsonl, record)


class Checkpoints(Hook):
  """Saves the train state at every epoch's end, before its validation (with the epoch's sums:
  a run stopped during the validation resumes with the validation), and inside epochs (with the
  sums so far) every `checkpoint_every_steps` steps or `checkpoint_every_secs` seconds,
  whichever comes first, and at the next step boundary after a stop was requested
  (`jaxlab.runtime.stop_on_signals`).

  Each save copies the state to the host at the boundary; serializing and writing happen in a
  background thread (`checkpoint.AsyncWriter`, one save in flight) while training goes on. The
  newest `keep_checkpoints` step checkpoints are kept, and checkpoints/best.msgpack is made
  another name of the epoch's step checkpoint when validation accuracy strictly improves (the
  first maximum: `jaxlab.run.best_record`), never a second write of it."""

  def __init__(self, background: bool = True):
    self.background = background
    self.writer: checkpoint.AsyncWriter | None = None

  def on_run_start(self, run: Run) -> None:
    super().on_run_start(run)
    for stale in run.checkpoints.glob("*.tmp*"):  # Left by a process killed mid-write.
      stale.unlink(missing_ok=True)
    self.writer = checkpoint.AsyncWriter(self.background)
    best = best_record(run.history)
    self.best = best[BEST_ON] if best else None
    self.saved_step, self.saved_time = run.start_step, time.monotonic()

  def wants_state(self, step: int) -> bool:
    config = self.run.config
    return (runtime.requested()
            or bool(config.checkpoint_every_steps
                    and step - self.saved_step >= config.checkpoint_every_steps)
            or bool(config.checkpoint_every_secs
                    and time.monotonic() - self.saved_time >= config.checkpoint_every_secs))

  def on_step_boundary(self, epoch: int, state: TrainState, sums: dict[str, Any]) -> None:
    self.save(state, sums, epoch - 1)

  def on_epoch_trained(self, epoch: int, state: TrainState, sums: dict[str, Any]) -> None:
    if int(state.step) != self.saved_step:  # Not when it resumed from this very checkpoint.
      self.save(state, sums, epoch)

  def on_epoch_end(self, epoch: int, record: dict[str, Any], state: TrainState) -> None:
    value = record.get(BEST_ON)
    if value is not None and (self.best is None or value > self.best):
      self.best = value
      self.writer.link(self.run.step_checkpoint(int(state.step)), self.run.best)

  def save(self, state: TrainState, sums: dict[str, Any], epoch: int) -> None:
    """Saves `state` and `sums` at its step; `epoch`: the epochs it has trained through."""
    host = checkpoint.to_host({"state": state, "sums": dict(sums)})
    step = int(host["state"].step)
    meta = {**self.run.identity, "step": step, "epoch": epoch, "time": time.time()}
    self.writer.save(self.run.step_checkpoint(step), host, meta, after=lambda: self._prune(step))
    self.saved_step, self.saved_time = step, time.monotonic()

  def _prune(self, newest: int) -> None:
    """Removes all but the newest `keep_checkpoints` step checkpoints (never `newest`; the best
    checkpoint is a name of its own, which outlives its step checkpoint)."""
    keep = self.run.config.keep_checkpoints
    for path in self.run.step_checkpoints()[keep:]:
      if path != self.run.step_checkpoint(newest):
        path.unlink(missing_ok=True)

  def flush(self) -> None:
    if self.writer is not None:
      self.writer.wait()

  def written(self) -> bool:
    return self.writer is None or self.writer.written()

  def close(self) -> None:
    if self.writer is not None:
      writer, self.writer = self.writer, None
      writer.close()


class NonFiniteGuard(Hook):
  """Stops the run (`NonFiniteError`, naming the epoch and step) as soon as a step's loss or
  gradient is not finite, under nan_policy=stop: the state that step produced is never saved,
  so the last checkpoints stay good. Under nan_policy=skip the steps were dropped on the device
  and are counted in the record's `skipped_steps`."""

  def on_epoch_start(self, epoch: int) -> None:
    self.epoch = epoch

  def on_chunk_end(self, steps: int, totals: dict[str, Any]) -> None:
    if totals["nonfinite"] and self.run.config.nan_policy == "stop":
      step = totals["first_nonfinite"]
      in_epoch = step - (self.epoch - 1) * self.run.steps_per_epoch + 1
      raise NonFiniteError(
          f"non-finite loss or gradient at epoch {self.epoch}, step {in_epoch} of "
          f"{self.run.steps_per_epoch} (global step {step + 1}); the run stopped, and the "
          f"checkpoints it saved before that step stay in {self.run.checkpoints}. Lower "
          "--learning_rate, or resume with --nan_policy=skip to drop such steps")


class StopOnSignal(Hook):
  """After a stop was requested (SIGTERM, SIGINT), raises `Preempted` at the next step
  boundary or epoch end; `Checkpoints`, earlier in the list, has saved the position by then.

  In a run of several processes the stop waits for the epoch's end, where the processes agree
  on it (a signal reaches each at another moment; they must all stop at the same step)."""

  def wants_state(self, step: int) -> bool:
    return runtime.requested() and jax.process_count() == 1

  def on_step_boundary(self, epoch: int, state: TrainState, sums: dict[str, Any]) -> None:
    step = int(state.step)
    in_epoch = step - (epoch - 1) * self.run.steps_per_epoch
    self._stop(f"in epoch {epoch} after step {in_epoch} of {self.run.steps_per_epoch}", step)

  def on_epoch_end(self, epoch: int, record: dict[str, Any], state: TrainState) -> None:
    if parallel.any_process(runtime.requested()):
      self._stop(f"after epoch {epoch}", int(state.step))

  def _stop(self, where: str, step: int) -> None:
    raise runtime.Preempted(f"stopped {where} (global step {step}); its checkpoint is "
                            f"{self.run.step_checkpoint(step)}")


class SummaryFile(Hook):
  """Writes metrics.json: after every epoch (status `running`, or `completed` after the last),
  and at the end the summary with the final evaluation."""

  def on_epoch_end(self, epoch: int, record: dict[str, Any], state: TrainState) -> None:
    run = self.run
    write_json(run.metrics_json, run.summarize(
        "running" if epoch < run.config.epochs else "completed",
        last=run.step_checkpoint(int(state.step))))

  def on_run_end(self, summary: dict[str, Any]) -> None:
    write_json(self.run.metrics_json, summary)


class OnEpochEnd(Hook):
  """A function `fn(epoch, record, state)` called after every epoch, as a hook."""

  def __init__(self, fn: Callable[[int, dict[str, Any], TrainState], None]):
    self.fn = fn

  def on_epoch_end(self, epoch: int, record: dict[str, Any], state: TrainState) -> None:
    self.fn(epoch, record, state)


class Hooks:
  """The hooks of every member of a group, called position by position: the i-th hook of every
  member before the (i+1)-th of any, so that every member has saved its checkpoint before one
  member's StopOnSignal stops the group. Per-member arguments are lists, one per member."""

  def __init__(self, runs: Sequence[Run], hooks: Sequence[Sequence[Hook]]):
    self.runs = list(runs)
    depth = max((len(h) for h in hooks), default=0)
    self.ordered = [(k, member_hooks[i]) for i in range(depth)
                    for k, member_hooks in enumerate(hooks) if i < len(member_hooks)]
    self._asking: list[tuple[int, Hook]] = []

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

  def step_boundary(self, epoch: int, state: TrainState,
                    totals: Sequence[dict[str, Any]]) -> None:
    """Only the hooks that asked (`wants_state`), with one host copy of the stacked state."""
    host = checkpoint.to_host(state)
    for k, hook in self._asking:
      hook.on_step_boundary(epoch, member(host, k), totals[k])

  def epoch_trained(self, epoch: int, state: TrainState,
                    totals: Sequence[dict[str, Any]]) -> TrainState:
    """Every hook, with one host copy of the stacked state; returns that copy (the state the
    validation leaves unchanged, for `epoch_end`)."""
    host = checkpoint.to_host(state)
    states = [member(host, k) for k in range(len(self.runs))]
    for k, hook in self.ordered:
      hook.on_epoch_trained(epoch, states[k], totals[k])
    return host

  def written(self) -> bool:
    return all([hook.written() for _, hook in self.ordered])

  def epoch_end(self, epoch: int, records: Sequence[dict[str, Any]], host: TrainState) -> None:
    """`host`: the stacked state after the epoch, already copied to the host."""
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
