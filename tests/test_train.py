"""Training: the loss falls, checkpoints round-trip, and an interrupted run resumes exactly."""

import json

import jax
import numpy as np
import pytest

from jaxlab.rundir import checkpoint
from jaxlab.experiment import build_model, resolve_config
from jaxlab.files import read_jsonl
from jaxlab.training.hooks import OnEpochEnd
from jaxlab.models import l2_penalty
from jaxlab.training.state import create_train_state, make_setup
from jaxlab.training.steps import chunk_lengths, make_steps, train_epoch
from jaxlab.training.train import train_and_evaluate
from datafiles import synthetic_dataset
from conftest import SMALL
from runstate import Crash, crash_after



def leaves(tree):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_short_run_loss_falls_and_writes_the_run_directory(tmp_path):
  config = resolve_config("mlp_baseline", **SMALL)
  summary = train_and_evaluate(config, tmp_path, dataset=synthetic_dataset())
  history = read_jsonl(tmp_path / "metrics.jsonl")
  assert [r["epoch"] for r in history] == [1, 2, 3]
  assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]
  assert history[-1]["val_accuracy"] > 0.9  # The synthetic classes are easy.
  for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "epoch_seconds"):
    assert all(np.isfinite(r[key]) for r in history), key
  assert history[-1]["step"] == 3 * 8  # 256 examples / batch 32, every epoch.
  on_disk = json.loads((tmp_path / "metrics.json").read_text())
  assert on_disk == summary and summary["status"] == "completed"
  assert summary["final_val_accuracy"] == history[-1]["val_accuracy"]
  assert summary["best_val_accuracy"] == max(r["val_accuracy"] for r in history)
  assert summary["total_params"] == summary["trainable_params"] + summary["non_trainable_params"]
  config_json = json.loads((tmp_path / "config.json").read_text())
  assert config_json["config"] == config.to_json()
  assert config_json["model"]["layers"][0] == {"name": "dense", "type": "Dense", "features": 128,
                                               "activation": "relu"}
  # The newest keep_checkpoints (2) step checkpoints, and the best.
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
      "best.msgpack", "step_000000016.msgpack", "step_000000024.msgpack"]
  assert summary["checkpoints"] == {"last": "checkpoints/step_000000024.msgpack",
                                    "best": "checkpoints/best.msgpack"}


def one_member(state):
  return jax.tree_util.tree_map(lambda x: x[None], state)


@pytest.mark.slow
def test_partial_last_batch_is_trained_like_keras():
  built = make_setup(build_model("mlp_baseline"), (28, 28, 1))
  steps = make_steps(built)
  state = create_train_state(built, seed=0, learning_rate=1e-3)
  ds = synthetic_dataset(n_train=70)
  state, metrics = train_epoch(steps, one_member(state), jax.device_put(ds.train_images),
                               jax.device_put(ds.train_labels), 32,
                               jax.random.PRNGKey(0)[None], 2)
  assert int(state.step[0]) == 3  # 32 + 32 + 6.
  assert metrics[0]["skipped_steps"] == 0


@pytest.mark.slow
def test_checkpoint_round_trip(tmp_path):
  built = make_setup(build_model("mlp_halving"), (28, 28, 1))
  state = create_train_state(built, seed=3, learning_rate=1e-3)
  steps = make_steps(built)
  ds = synthetic_dataset()
  state, _ = train_epoch(steps, one_member(state), jax.device_put(ds.train_images),
                         jax.device_put(ds.train_labels), 64, jax.random.PRNGKey(1)[None], 2)
  state = jax.tree_util.tree_map(lambda x: x[0], state)
  expected = leaves(state)
  checkpoint.save(tmp_path / "c.msgpack", {"epoch": 1, "state": state})
  fresh = create_train_state(built, seed=99, learning_rate=1e-3)
  restored = checkpoint.restore(tmp_path / "c.msgpack", {"epoch": 0, "state": fresh})
  assert restored["epoch"] == 1
  got = leaves(restored["state"])
  assert len(got) == len(expected)
  for a, b in zip(got, expected):
    np.testing.assert_array_equal(a, b)


def test_checkpoint_of_another_model_is_refused(tmp_path):
  state = create_train_state(make_setup(build_model("mlp_halving"), (28, 28, 1)), seed=0,
                             learning_rate=1e-3)
  checkpoint.save(tmp_path / "c.msgpack", {"epoch": 1, "state": state})
  other = create_train_state(make_setup(build_model("mlp_baseline"), (28, 28, 1)), seed=0,
                             learning_rate=1e-3)
  with pytest.raises(checkpoint.CheckpointError, match="does not fit: 'state/params/batch_normalization/bias' has shape \\(512,\\) in the file but \\(128,\\)"):
    checkpoint.restore(tmp_path / "c.msgpack", {"epoch": 0, "state": other})
  (tmp_path / "bad.msgpack").write_bytes(b"\xc1garbage")
  with pytest.raises(checkpoint.CheckpointError, match="not a readable msgpack"):
    checkpoint.restore(tmp_path / "bad.msgpack", {"epoch": 0, "state": other})
  with pytest.raises(checkpoint.CheckpointError, match="no checkpoint at"):
    checkpoint.restore(tmp_path / "missing.msgpack", {"epoch": 0, "state": other})


@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["mlp_dropout", "mlp_parallel_paths"])
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, experiment):
  config = resolve_config(experiment, **SMALL)
  ds = synthetic_dataset()
  final = {}

  def keep(e, record, state):
    final["state"] = jax.tree_util.tree_map(np.asarray, state)

  train_and_evaluate(config, tmp_path / "straight", dataset=ds, hooks=[OnEpochEnd(keep)])
  straight = leaves(final.pop("state"))
  with pytest.raises(Crash):
    train_and_evaluate(config, tmp_path / "resumed", dataset=ds, hooks=[crash_after(1)])
  assert len(read_jsonl(tmp_path / "resumed" / "metrics.jsonl")) == 1
  summary = train_and_evaluate(config, tmp_path / "resumed", dataset=ds, hooks=[OnEpochEnd(keep)])
  resumed = leaves(final.pop("state"))
  for a, b in zip(resumed, straight):
    np.testing.assert_array_equal(a, b)
  history = read_jsonl(tmp_path / "resumed" / "metrics.jsonl")
  assert [r["epoch"] for r in history] == [1, 2, 3]
  straight_history = read_jsonl(tmp_path / "straight" / "metrics.jsonl")
  assert [r["val_accuracy"] for r in history] == [r["val_accuracy"] for r in straight_history]
  assert summary["epochs_completed"] == 3


def test_metrics_after_the_checkpoint_are_rerun(tmp_path):
  config = resolve_config("mlp_baseline", **SMALL)
  ds = synthetic_dataset()
  with pytest.raises(Crash):
    train_and_evaluate(config, tmp_path, dataset=ds, hooks=[crash_after(2)])
  # A crash between writing epoch 3's metrics line and its checkpoint: a stray line 3.
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  (tmp_path / "metrics.jsonl").write_text("\n".join(lines + [lines[-1].replace(
      '"epoch": 2', '"epoch": 3')]) + "\n")
  # And epoch 2's checkpoint lost: the newest is epoch 1's (8 steps per epoch).
  (tmp_path / "checkpoints" / "step_000000016.msgpack").unlink()
  train_and_evaluate(config, tmp_path, dataset=ds)
  assert [r["epoch"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def test_resume_with_other_settings_is_refused(tmp_path):
  ds = synthetic_dataset()
  train_and_evaluate(resolve_config("mlp_baseline", **{**SMALL, "epochs": 1}), tmp_path,
                     dataset=ds)
  with pytest.raises(ValueError, match="batch_size: 32 -> 16"):
    train_and_evaluate(resolve_config("mlp_baseline", **{**SMALL, "batch_size": 16}), tmp_path,
                       dataset=ds)
  # More epochs extend the run.
  summary = train_and_evaluate(resolve_config("mlp_baseline", **{**SMALL, "epochs": 2}),
                               tmp_path, dataset=ds)
  assert summary["epochs_completed"] == 2


def test_l2_penalty_is_c_times_sum_of_squares():
  params = {"a": {"kernel": np.full((2, 3), 2.0, np.float32)},
            "b": {"kernel": np.arange(4, dtype=np.float32)}, "c": {"kernel": np.ones(5)}}
  got = float(l2_penalty(params, {"a": 0.01, "b": 0.5}))
  assert got == pytest.approx(0.01 * 6 * 4 + 0.5 * (0 + 1 + 4 + 9), rel=1e-6)


@pytest.mark.parametrize("bad,match", [
    (dict(epochs=0), "epochs must be a positive integer, got 0"),
    (dict(batch_size=-4), "batch_size must be a positive integer, got -4"),
    (dict(learning_rate=0.0), "learning_rate must be a positive number, got 0.0"),
    (dict(optimizer="adamw2"), "unknown optimizer 'adamw2'; known optimizers: adam, sgd"),
    (dict(dataset="svhn"), "unknown dataset 'svhn'; known datasets: mnist, fashion_mnist"),
    (dict(precision="fp8"), "unknown precision 'fp8'; known: float32, bf16"),
    (dict(train_limit=0), "train_limit must be a positive integer, got 0"),
])
def test_bad_settings_are_named(bad, match):
  with pytest.raises((ValueError, LookupError), match=match):
    resolve_config("mlp_baseline", **bad)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "nadam", "rmsprop"])
def test_every_optimizer_trains(tmp_path, optimizer):
  config = resolve_config("mlp_halving", **{**SMALL, "epochs": 2, "optimizer": optimizer,
                                            "learning_rate": 0.01})
  train_and_evaluate(config, tmp_path, dataset=synthetic_dataset())
  history = read_jsonl(tmp_path / "metrics.jsonl")
  assert history[-1]["train_loss"] < history[0]["train_loss"]


@pytest.mark.parametrize("num_steps,max_length", [(468, 50), (467, 50), (8, 3), (2, 50), (1, 1),
                                                  (100, 7)])
def test_chunks_cover_every_step_once(num_steps, max_length):
  chunks = chunk_lengths(num_steps, max_length)
  assert [s for s, _ in chunks] == list(np.cumsum([0] + [n for _, n in chunks[:-1]]))
  assert sum(n for _, n in chunks) == num_steps
  assert all(0 < n <= max_length for _, n in chunks)
  assert len({n for _, n in chunks}) <= 2  # At most two compiled lengths.


def test_every_setting_says_what_it_is():
  """Each TrainConfig field declares its role once; the lists of settings derive from it."""
  import dataclasses
  from jaxlab import config
  from jaxlab.config import TrainConfig
  roles = {f.name: f.metadata["role"] for f in dataclasses.fields(TrainConfig)}
  assert set(roles.values()) <= set(config.ROLES)
  assert "epochs" in config.RESUMABLE_CHANGES and "batch_size" not in config.RESUMABLE_CHANGES
  assert "data_dir" in config.NO_RESULT_CHANGE and "seed" not in config.NO_RESULT_CHANGE
  assert set(config.WHERE_SETTINGS) <= set(config.NO_RESULT_CHANGE) & set(
      config.RESUMABLE_CHANGES)
  assert config.GROUP_SETTINGS == config.settings("member") == ("learning_rate", "seed")
  # A resumed run may change a setting of the resumable roles, and no other.
  old = TrainConfig(experiment="x", dataset="mnist", epochs=1, batch_size=8, optimizer="adam",
                    learning_rate=1e-3).to_json()
  for name in roles:
    if name in ("experiment",):
      continue
    changed = config.changed_settings(old, {**old, name: "other"})
    assert bool(changed) == (name not in config.RESUMABLE_CHANGES), name


@pytest.mark.parametrize("secs,steps", [(0.0, [8, 16]), (1e-9, [4, 8, 12, 16])])
def test_checkpoint_every_secs_saves_inside_epochs(tmp_path, secs, steps):
  """With checkpoints by time only (--checkpoint_every_steps=0), each compiled call's boundary
  past the time saves one; with 0 seconds, only the epochs' ends do (8 steps an epoch, calls
  of 4)."""
  config = resolve_config("mlp_baseline", **{**SMALL, "epochs": 2, "checkpoint_every_steps": 0,
                                             "checkpoint_every_secs": secs,
                                             "keep_checkpoints": 10})
  train_and_evaluate(config, tmp_path, dataset=synthetic_dataset())
  assert sorted(int(p.name[5:14]) for p in (tmp_path / "checkpoints").glob("step_*")) == steps
