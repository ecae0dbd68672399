"""TensorBoard event files: read back with TensorBoard's own reader, equal to metrics.jsonl."""

import json

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata as hparams_metadata

from jaxlab.experiment import resolve_config
from jaxlab.files import read_jsonl
from jaxlab.training.train import train_and_evaluate
from datafiles import synthetic_dataset
from conftest import SMALL
from runstate import Crash, crash_after

EXPECTED = {"train": {"epoch_loss": "train_loss", "epoch_accuracy": "train_accuracy",
                      "epoch_learning_rate": "learning_rate", "epoch_seconds": "epoch_seconds"},
            "validation": {"epoch_loss": "val_loss", "epoch_accuracy": "val_accuracy"}}



def assert_events_equal_metrics(run):
  """Every tag holds one point per epoch of metrics.jsonl, equal to it in float32 (the type of
  a TensorBoard scalar), read without TensorBoard's purging of re-written steps."""
  history = read_jsonl(run / "metrics.jsonl")
  assert history, "no metrics"
  for split, tags in EXPECTED.items():
    directory = run / "tensorboard" / split
    assert len(list(directory.glob("events.out.tfevents.*"))) == 1, split
    events = EventAccumulator(str(directory), purge_orphaned_data=False)
    events.Reload()
    assert set(events.Tags()["scalars"]) == set(tags), split
    for tag, key in tags.items():
      points = events.Scalars(tag)
      assert [p.step for p in points] == [r["epoch"] for r in history], (split, tag)
      assert [p.value for p in points] == [np.float32(r[key]) for r in history], (split, tag)
      assert [p.wall_time for p in points] == pytest.approx([r["time"] for r in history])


@pytest.mark.slow
def test_events_match_metrics_also_after_a_resume(tmp_path):
  config = resolve_config("mlp_dropout", **SMALL)
  ds = synthetic_dataset()
  with pytest.raises(Crash):
    train_and_evaluate(config, tmp_path, dataset=ds, hooks=[crash_after(1)])
  assert_events_equal_metrics(tmp_path)
  train_and_evaluate(config, tmp_path, dataset=ds)
  assert [r["epoch"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]
  assert_events_equal_metrics(tmp_path)


def test_an_epoch_trained_twice_is_written_once(tmp_path):
  """A crash after epoch 2 was written everywhere but its checkpoint was lost: the resumed run
  trains epoch 2 again, and the events hold the new epoch 2 once."""
  config = resolve_config("mlp_baseline", **SMALL)
  ds = synthetic_dataset()
  with pytest.raises(Crash):
    train_and_evaluate(config, tmp_path / "run", dataset=ds, hooks=[crash_after(2)])
  (tmp_path / "run" / "checkpoints" / "step_000000016.msgpack").unlink()  # 8 steps an epoch.
  first_epoch_2 = read_jsonl(tmp_path / "run" / "metrics.jsonl")[1]
  train_and_evaluate(config, tmp_path / "run", dataset=ds)
  history = read_jsonl(tmp_path / "run" / "metrics.jsonl")
  assert [r["epoch"] for r in history] == [1, 2, 3]
  assert history[1]["time"] != first_epoch_2["time"]  # Epoch 2 really was trained again.
  assert_events_equal_metrics(tmp_path / "run")
  assert_hparams_equal_run(tmp_path / "run", config)


def assert_hparams_equal_run(run, config):
  """TensorBoard's hparams plugin finds the run's settings in one session-start summary and
  its final metrics (metrics.json's) as scalars, once each, also after a resume."""
  events = EventAccumulator(str(run / "tensorboard"), purge_orphaned_data=False)
  events.Reload()
  assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
  start = hparams_metadata.parse_session_start_info_plugin_data(
      events.SummaryMetadata(hparams_metadata.SESSION_START_INFO_TAG).plugin_data.content)
  assert start.hparams["experiment"].string_value == config.experiment
  assert start.hparams["learning_rate"].number_value == pytest.approx(config.learning_rate)
  assert start.hparams["epochs"].number_value == config.epochs
  assert start.hparams["seed"].number_value == config.seed
  summary = json.loads((run / "metrics.json").read_text())
  for tag, key in {"final/val_accuracy": "final_val_accuracy",
                   "final/best_val_accuracy": "best_val_accuracy",
                   "final/val_loss": "final_val_loss"}.items():
    points = events.Scalars(tag)
    assert [(p.step, p.value) for p in points] == [(config.epochs, np.float32(summary[key]))]
