"""TensorBoard event files, written with TensorBoard's own package (no TensorFlow).

The layout is that of Keras's TensorBoard callback, so `tensorboard --logdir DIR` overlays
train and validation curves and compares every run under DIR:

  RUN/tensorboard/train/       epoch_loss, epoch_accuracy, epoch_learning_rate, epoch_seconds
  RUN/tensorboard/validation/  epoch_loss, epoch_accuracy

One point per epoch, at step = the epoch number (1, 2, ...) as in metrics.jsonl, with the
epoch's end as its wall time. The values are metrics.jsonl's: `epoch_loss` under train is
`train_loss` (data loss plus L2), under validation `val_loss`.

  RUN/tensorboard/             HParams: the run's settings (config.json's), and at its end
                               final/val_accuracy, final/best_val_accuracy, final/val_loss

so that `tensorboard --logdir LAB` lists every run of a lab in its HParams tab, one row per run
with its settings and final metrics (summaries written by TensorBoard's own hparams plugin).
"""

from __future__ import annotations

import time
from typing import Any

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.hparams import summary_v2 as hparams_summary
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from jaxlab.hooks import Hook
from jaxlab.run import Run
from jaxlab.state import TrainState

# TensorBoard tag -> metrics.jsonl field, for each of the two event directories.
TAGS = {
    "train": {"epoch_loss": "train_loss", "epoch_accuracy": "train_accuracy",
              "epoch_learning_rate": "learning_rate", "epoch_seconds": "epoch_seconds"},
    "validation": {"epoch_loss": "val_loss", "epoch_accuracy": "val_accuracy"},
}


# HParams metrics, written at the run's end: TensorBoard tag -> metrics.json field.
FINAL = {"final/val_accuracy": "final_val_accuracy",
         "final/best_val_accuracy": "best_val_accuracy", "final/val_loss": "final_val_loss"}


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
    for split in ("", *TAGS):
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
    for tag, key in FINAL.items():
      if summary.get(key) is not None:
        self._writers[""].add_event(scalar_event(tag, summary[key],
                                                 summary.get("epochs_completed", 0), time.time()))
    self._flush()

  def _write(self, record: dict[str, Any]) -> None:
    wall_time = record.get("time", time.time())
    for split, tags in TAGS.items():
      for tag, key in tags.items():
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
