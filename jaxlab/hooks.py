"""Side effects of a training run, as small objects the epoch loop calls at fixed points.

The loop (`jaxlab.train`) only trains and evaluates; everything it leaves behind (the metrics
line, checkpoints, metrics.json, TensorBoard events, the progress bar) is a `Hook`, as Keras
callbacks and CLU's periodic actions are. A hook overrides the methods it needs:

  on_run_start(info)                  after set-up and resumption, before the first epoch
  on_epoch_start(epoch)
  on_chunk_end(steps, totals)         as each compiled call's metric sums reach the host
  wants_state(step) -> bool           at each step boundary inside an epoch: True asks for
  on_step_boundary(epoch, state, sums)  this call, with the state after global step `step`
  on_epoch_end(epoch, record, state)  after validation; `record` is the metrics.jsonl line
  flush()                             before the final evaluation: finish pending writes
  on_run_end(summary)                 after the final evaluation; `summary` is metrics.json
  close()                             always, last, also when the run fails or is interrupted

A step boundary is the end of a compiled call (`--steps_per_dispatch` steps); asking for the
state there costs one wait for the device, so hooks ask only when they need it.

Hooks run in list order; `jaxlab.train.default_hooks` puts the files first, so a later hook
(a user's) sees an epoch already on disk.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any, Callable

import jax
from absl import logging

from jaxlab import checkpoint, parallel, preemption
from jaxlab.config import TrainConfig
from jaxlab.errors import NonFiniteError
from jaxlab.metrics import append_jsonl
from jaxlab.rundir import RunDir, write_summary
from jaxlab.state import TrainState
from jaxlab.steps import train_sums_zeros


@dataclasses.dataclass
class RunInfo:
  """What hooks may read about the run. `history` holds every finished epoch's record; the
  loop appends to it before it calls `on_epoch_end`."""

  run: RunDir
  config: TrainConfig
  history: list[dict[str, Any]]
  start_epoch: int  # The epoch the run resumed after (0 for a fresh run).
  steps_per_epoch: int
  counts: dict[str, int]  # total_params, trainable_params, non_trainable_params.
  start_step: int = 0  # The global step it resumed at (inside epoch start_epoch + 1).
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)  # For its checkpoints.
  label: str = ""  # The member's name in a group's log lines ("seed_3"); "" for a lone run.


class Hook:
  """A no-op at every point of the loop; subclasses override what they need."""

  info: RunInfo

  def on_run_start(self, info: RunInfo) -> None:
    self.info = info

  def on_epoch_start(self, epoch: int) -> None:
    pass

  def on_chunk_end(self, steps: int, totals: dict[str, float]) -> None:
    pass

  def wants_state(self, step: int) -> bool:
    return False

  def on_step_boundary(self, epoch: int, state: TrainState, sums: dict[str, Any]) -> None:
    pass

  def on_epoch_end(self, epoch: int, record: dict[str, Any], state: TrainState) -> None:
    pass

  def flush(self) -> None:
    pass

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
      self._bar = tqdm(total=self.info.steps_per_epoch,
                       desc=f"epoch {epoch}/{self.info.config.epochs}", unit="step",
                       file=sys.stderr, dynamic_ncols=True, leave=True)

  def on_chunk_end(self, steps: int, totals: dict[str, float]) -> None:
    if self._bar is not None:
      n = max(totals["count"], 1)
      self._bar.set_postfix(loss=f"{totals['loss_sum'] / n:.4f}",
                            accuracy=f"{totals['correct'] / n:.4f}", refresh=False)
      self._bar.update(steps)

  def on_epoch_end(self, epoch: int, record: dict[str, Any], state: TrainState) -> None:
    if self._bar is not None:
      self._bar.set_postfix_str(epoch_line(record), refresh=False)
      self.close()

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None


class MetricsLog(Hook):
  """Appends each epoch's record to metrics.jsonl (fsynced) and logs it."""

  def on_epoch_end(self, epoch: int, record: dict[str, Any], state: TrainState) -> None:
    label = f"{self.info.label} " if self.info.label else ""
    logging.info("%sepoch %d/%d: %s | %.1f s", label, epoch, self.info.config.epochs,
                 epoch_line(record), record["epoch_seconds"])
    append_jsonl(self.info.run.metrics_jsonl, record)


class Checkpoints(Hook):
  """Saves the train state at every epoch's end, and inside epochs every
  `checkpoint_every_steps` steps or `checkpoint_every_secs` seconds, whichever comes first, and
  at the next step boundary after a stop was requested (`jaxlab.preemption`).

  Each save copies the state to the host at the boundary; serializing and writing happen in a
  background thread (`checkpoint.AsyncWriter`, one save in flight) while training goes on. The
  newest `keep_checkpoints` step checkpoints are kept, and checkpoints/best.msgpack is rewritten
  when validation accuracy strictly improves (the first maximum)."""

  def __init__(self, background: bool = True):
    self.background = background
    self.writer: checkpoint.AsyncWriter | None = None

  def on_run_start(self, info: RunInfo) -> None:
    super().on_run_start(info)
    for stale in info.run.checkpoints.glob("*.tmp*"):  # Left by a process killed mid-write.
      stale.unlink(missing_ok=True)
    self.writer = checkpoint.AsyncWriter(self.background)
    self.best = max((r["val_accuracy"] for r in info.history
                     if r.get("val_accuracy") is not None), default=-1.0)
    self.saved_step, self.saved_time = info.start_step, time.monotonic()

  def wants_state(self, step: int) -> bool:
    config = self.info.config
    return (preemption.requested()
            or bool(config.checkpoint_every_steps
                    and step - self.saved_step >= config.checkpoint_every_steps)
            or bool(config.checkpoint_every_secs
                    and time.monotonic() - self.saved_time >= config.checkpoint_every_secs))

  def on_step_boundary(self, epoch: int, state: TrainState, sums: dict[str, Any]) -> None:
    self.save(state, sums, epoch - 1, best=False)

  def on_epoch_end(self, epoch: int, record: dict[str, Any], state: TrainState) -> None:
    improved = record["val_accuracy"] is not None and record["val_accuracy"] > self.best
    if improved:
      self.best = record["val_accuracy"]
    self.save(state, train_sums_zeros(), epoch, best=improved)

  def save(self, state: TrainState, sums: dict[str, Any], epochs_done: int, best: bool) -> None:
    host = checkpoint.to_host({"state": state, "sums": dict(sums)})
    step = int(host["state"].step)
    run = self.info.run
    paths = [run.step_checkpoint(step)] + ([run.best] if best else [])
    meta = {**self.info.meta, "step": step, "epoch": epochs_done, "time": time.time()}
    self.writer.save(paths, host, meta, after=lambda: self._prune(step))
    self.saved_step, self.saved_time = step, time.monotonic()

  def _prune(self, newest: int) -> None:
    """Removes all but the newest `keep_checkpoints` step checkpoints (never `newest`)."""
    keep = self.info.config.keep_checkpoints
    for path in self.info.run.step_checkpoints()[keep:]:
      if path != self.info.run.step_checkpoint(newest):
        path.unlink(missing_ok=True)

  def flush(self) -> None:
    if self.writer is not None:
      self.writer.wait()

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
    if totals["nonfinite"] and self.info.config.nan_policy == "stop":
      step = totals["first_nonfinite"]
      in_epoch = step - (self.epoch - 1) * self.info.steps_per_epoch + 1
      raise NonFiniteError(
          f"non-finite loss or gradient at epoch {self.epoch}, step {in_epoch} of "
          f"{self.info.steps_per_epoch} (global step {step + 1}); the run stopped, and the "
          f"checkpoints it saved before that step stay in {self.info.run.checkpoints}. Lower "
          "--learning_rate, or resume with --nan_policy=skip to drop such steps")


class StopOnSignal(Hook):
  """After a stop was requested (SIGTERM, SIGINT), raises `Preempted` at the next step
  boundary or epoch end; `Checkpoints`, earlier in the list, has saved the position by then.

  In a run of several processes the stop waits for the epoch's end, where the processes agree
  on it (a signal reaches each at another moment; they must all stop at the same step)."""

  def wants_state(self, step: int) -> bool:
    return preemption.requested() and jax.process_count() == 1

  def on_step_boundary(self, epoch: int, state: TrainState, sums: dict[str, Any]) -> None:
    step = int(state.step)
    in_epoch = step - (epoch - 1) * self.info.steps_per_epoch
    self._stop(f"in epoch {epoch} after step {in_epoch} of {self.info.steps_per_epoch}", step)

  def on_epoch_end(self, epoch: int, record: dict[str, Any], state: TrainState) -> None:
    if parallel.any_process(preemption.requested()):
      self._stop(f"after epoch {epoch}", int(state.step))

  def _stop(self, where: str, step: int) -> None:
    raise preemption.Preempted(f"stopped {where} (global step {step}); its checkpoint is "
                               f"{self.info.run.step_checkpoint(step)}")


class SummaryFile(Hook):
  """Rewrites metrics.json after every epoch: status `running`, or `completed` at the end."""

  def on_epoch_end(self, epoch: int, record: dict[str, Any], state: TrainState) -> None:
    info = self.info
    write_summary(info.run, info.config, info.history, info.counts,
                  "running" if epoch < info.config.epochs else "completed",
                  last=info.run.step_checkpoint(int(state.step)))


class OnEpochEnd(Hook):
  """A function `fn(epoch, record, state)` called after every epoch, as a hook."""

  def __init__(self, fn: Callable[[int, dict[str, Any], TrainState], None]):
    self.fn = fn

  def on_epoch_end(self, epoch: int, record: dict[str, Any], state: TrainState) -> None:
    self.fn(epoch, record, state)
