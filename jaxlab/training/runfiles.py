"""A run's own files and checks, which the epoch loop calls itself, in order, at fixed points.

The epoch loop (`jaxlab.training.train`) calls a `RunFiles` of each run by name, in this order,
before any hook (`jaxlab.training.hooks`: what a user adds, and TensorBoard):

  start()                           config.json; metrics.jsonl rewritten to the run's history
                                    (a resumed run drops the epochs after its checkpoint, which
                                    it trains again); files left by a killed write removed
  check_finite(epoch, totals)       as each compiled call's sums reach the host: under
                                    nan_policy=stop a non-finite loss or gradient stops the run
                                    before the state it produced can be saved
  checkpoint_due(step), save(...)   at step boundaries inside an epoch: every
                                    `checkpoint_every_steps` steps or `checkpoint_every_secs`
                                    seconds, and when a stop was requested (the loop then stops)
  epoch_trained(epoch, state, sums) after the epoch's last step, before its validation: the
                                    checkpoint, with the epoch's sums (a run stopped during the
                                    validation resumes with the validation)
  epoch_validated(epoch, record, step)  the metrics line (fsynced, logged), best.msgpack named
                                    on strict improvement, metrics.json
  flush(), written()                the background writer's saves on disk
  finish(summary)                   metrics.json with the final evaluation
  close()                           always, last

A process that is not the writer of a multi-process run (`parallel.is_writer`) writes nothing;
its checks still run.

Each save copies the state to the host at the boundary; serializing and writing happen in a
background thread (`checkpoint.AsyncWriter`, one save in flight) while training goes on. The
newest `keep_checkpoints` step checkpoints are kept, and checkpoints/best.msgpack is made
another name of the epoch's step checkpoint when validation accuracy strictly improves (the
first maximum: `jaxlab.rundir.run.best_record`), never a second write of it.
"""

from __future__ import annotations

import time
from typing import Any

from absl import logging

from jaxlab.errors import NonFiniteError
from jaxlab.rundir import checkpoint
from jaxlab.files import append_jsonl, write_json, write_jsonl
from jaxlab.rundir.run import Run, best_record
from jaxlab.training import process
from jaxlab.training.state import TrainState


def epoch_line(record: dict[str, Any]) -> str:
  """The record in one line; a mean of no steps (all skipped) shows as `-`."""
  fields = (("loss", "train_loss"), ("accuracy", "train_accuracy"), ("val_loss", "val_loss"),
            ("val_accuracy", "val_accuracy"))
  line = " ".join(f"{name}={record[key]:.4f}" if record[key] is not None else f"{name}=-"
                  for name, key in fields)
  return line + (f" skipped_steps={record['skipped_steps']}" if record.get("skipped_steps")
                 else "")


class RunFiles:
  """One run's files and checks, as the module doc lists them; `writer`: whether this process
  writes them (`background=False`: every save written before `save` returns)."""

  def __init__(self, run: Run, writer: bool = True, background: bool = True):
    self.run, self.writer = run, writer
    self._background = background
    self._saver: checkpoint.AsyncWriter | None = None
    self.saved_step, self.saved_time = run.start_step, time.monotonic()

  def start(self) -> None:
    run = self.run
    self.saved_step, self.saved_time = run.start_step, time.monotonic()
    if not self.writer:
      return
    write_json(run.config_file, run.description())
    write_jsonl(run.metrics_jsonl, run.history)
    for stale in run.checkpoints.glob("*.tmp*"):  # Left by a process killed mid-write.
      stale.unlink(missing_ok=True)
    self._saver = checkpoint.AsyncWriter(self._background)

  def check_finite(self, epoch: int, totals: dict[str, Any]) -> None:
    """Raises `NonFiniteError`, naming the epoch and step, where a step of the epoch so far had
    a non-finite loss or gradient under nan_policy=stop (under skip, the steps were dropped on
    the device and are counted in the record's `skipped_steps`)."""
    run = self.run
    if totals["nonfinite"] and run.config.nan_policy == "stop":
      step = totals["first_nonfinite"]
      in_epoch = step - (epoch - 1) * run.steps_per_epoch + 1
      raise NonFiniteError(
          f"non-finite loss or gradient at epoch {epoch}, step {in_epoch} of "
          f"{run.steps_per_epoch} (global step {step + 1}); the run stopped, and the "
          f"checkpoints it saved before that step stay in {run.checkpoints}. Lower "
          "--learning_rate, or resume with --nan_policy=skip to drop such steps")

  def checkpoint_due(self, step: int) -> bool:
    """Whether the state after global step `step` (a boundary inside an epoch) is to be saved."""
    config = self.run.config
    return self.writer and (
        process.requested()
        or bool(config.checkpoint_every_steps
                and step - self.saved_step >= config.checkpoint_every_steps)
        or bool(config.checkpoint_every_secs
                and time.monotonic() - self.saved_time >= config.checkpoint_every_secs))

  def epoch_trained(self, epoch: int, state: TrainState, sums: dict[str, Any]) -> None:
    if int(state.step) != self.saved_step:  # Not when it resumed from this very checkpoint.
      self.save(state, sums, epoch)

  def save(self, state: TrainState, sums: dict[str, Any], epoch: int) -> None:
    """Saves `state` (one member's, on the host) and `sums` at its step; `epoch`: the epochs it
    has trained through."""
    if not self.writer:
      return
    host = checkpoint.to_host(checkpoint.checkpoint_template(state, sums))
    step = int(host["state"].step)
    meta = {**self.run.identity, "step": step, "epoch": epoch, "time": time.time()}
    self._saver.save(self.run.step_checkpoint(step), host, meta, after=lambda: self._prune(step))
    self.saved_step, self.saved_time = step, time.monotonic()

  def _prune(self, newest: int) -> None:
    """Removes all but the newest `keep_checkpoints` step checkpoints (never `newest`; the best
    checkpoint is a name of its own, which outlives its step checkpoint)."""
    keep = self.run.config.keep_checkpoints
    for path in self.run.step_checkpoints()[keep:]:
      if path != self.run.step_checkpoint(newest):
        path.unlink(missing_ok=True)

  def epoch_validated(self, epoch: int, record: dict[str, Any], step: int) -> None:
    """The epoch's record (already in the run's history), at global step `step`: its line,
    the best checkpoint, metrics.json."""
    if not self.writer:
      return
    run = self.run
    label = f"{run.label} " if run.label else ""
    logging.info("%sepoch %d/%d: %s | %.1f s", label, epoch, run.config.epochs,
                 epoch_line(record), record["epoch_seconds"])
    append_jsonl(run.metrics_jsonl, record)
    if best_record(run.history) is record:  # A strict improvement: the first maximum.
      self._saver.link(run.step_checkpoint(step), run.best)
    write_json(run.metrics_json, run.summarize(
        "running" if epoch < run.config.epochs else "completed", last=run.step_checkpoint(step)))

  def flush(self) -> None:
    if self._saver is not None:
      self._saver.wait()

  def written(self) -> bool:
    """Waits until what was handed to the writer is on disk; whether it is, without error."""
    return self._saver is None or self._saver.written()

  def finish(self, summary: dict[str, Any]) -> None:
    if self.writer:
      write_json(self.run.metrics_json, summary)

  def close(self) -> None:
    if self._saver is not None:
      saver, self._saver = self._saver, None
      saver.close()
