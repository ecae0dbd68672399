"""Side effects of a training run, as small objects the epoch loop calls at fixed points.

The loop (`jaxlab.train`) only trains and evaluates; everything it leaves behind (the metrics
line, checkpoints, metrics.json, TensorBoard events, the progress bar) is a `Hook`, as Keras
callbacks and CLU's periodic actions are. A hook overrides the methods it needs:

  on_run_start(info)                  after set-up and resumption, before the first epoch
  on_epoch_start(epoch)
  on_chunk_end(steps, totals)         as each compiled call's metric sums reach the host
  on_epoch_end(epoch, record, state)  after validation; `record` is the metrics.jsonl line
  on_run_end(summary)                 after the final evaluation; `summary` is metrics.json
  close()                             always, last, also when the run fails or is interrupted

Hooks run in list order; `jaxlab.train.default_hooks` puts the files first, so a later hook
(a user's) sees an epoch already on disk.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable

from absl import logging

from jaxlab import checkpoint
from jaxlab.config import TrainConfig
from jaxlab.metrics import append_jsonl
from jaxlab.rundir import RunDir, write_summary
from jaxlab.state import TrainState


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


class Hook:
  """A no-op at every point of the loop; subclasses override what they need."""

  info: RunInfo

  def on_run_start(self, info: RunInfo) -> None:
    self.info = info

  def on_epoch_start(self, epoch: int) -> None:
    pass

  def on_chunk_end(self, steps: int, totals: dict[str, float]) -> None:
    pass

  def on_epoch_end(self, epoch: int, record: dict[str, Any], state: TrainState) -> None:
    pass

  def on_run_end(self, summary: dict[str, Any]) -> None:
    pass

  def close(self) -> None:
    pass


def epoch_line(record: dict[str, Any]) -> str:
  return (f"loss={record['train_loss']:.4f} accuracy={record['train_accuracy']:.4f} "
          f"val_loss={record['val_loss']:.4f} val_accuracy={record['val_accuracy']:.4f}")


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
    logging.info("epoch %d/%d: %s | %.1f s", epoch, self.info.config.epochs, epoch_line(record),
                 record["epoch_seconds"])
    append_jsonl(self.info.run.metrics_jsonl, record)


class Checkpoints(Hook):
  """Saves the train state as checkpoints/last.msgpack after every epoch, and as
  checkpoints/best.msgpack when validation accuracy strictly improves (the first maximum)."""

  def on_run_start(self, info: RunInfo) -> None:
    super().on_run_start(info)
    self.best = max((r["val_accuracy"] for r in info.history), default=-1.0)

  def on_epoch_end(self, epoch: int, record: dict[str, Any], state: TrainState) -> None:
    payload = {"epoch": epoch, "state": state}
    if record["val_accuracy"] > self.best:
      self.best = record["val_accuracy"]
      checkpoint.save(self.info.run.best, payload)
    checkpoint.save(self.info.run.last, payload)


class SummaryFile(Hook):
  """Rewrites metrics.json after every epoch: status `running`, or `completed` at the end."""

  def on_epoch_end(self, epoch: int, record: dict[str, Any], state: TrainState) -> None:
    info = self.info
    write_summary(info.run, info.config, info.history, info.counts,
                  "running" if epoch < info.config.epochs else "completed")


class OnEpochEnd(Hook):
  """A function `fn(epoch, record, state)` called after every epoch, as a hook."""

  def __init__(self, fn: Callable[[int, dict[str, Any], TrainState], None]):
    self.fn = fn

  def on_epoch_end(self, epoch: int, record: dict[str, Any], state: TrainState) -> None:
    self.fn(epoch, record, state)
