"""The report's grouping of runs, on run directories written by hand."""

import json

from jaxlab.report import find_runs


def fake_run(directory, seed, final, **settings):
  directory.mkdir(parents=True)
  config = {"experiment": "mlp_halving", "dataset": "mnist", "epochs": 2, "batch_size": 32,
            "optimizer": "adam", "learning_rate": 0.001, "seed": seed, **settings}
  (directory / "config.json").write_text(json.dumps({"config": config}))
  (directory / "metrics.json").write_text(json.dumps({
      "status": "completed", "final_val_accuracy": final, "best_val_accuracy": final,
      "evaluation": {"final": {"confusion_matrix": [[1, 0], [0, 1]]}}}))


def test_settings_that_do_not_change_results_do_not_split_seeds(tmp_path):
  # Seed 0 was written before the checkpoint settings existed; 1 and 2 after, on 8 devices.
  fake_run(tmp_path / "a" / "seed_0", 0, 0.8)
  for seed in (1, 2):
    fake_run(tmp_path / "a" / f"seed_{seed}", seed, 0.9, checkpoint_every_secs=600.0,
             keep_checkpoints=2, nan_policy="stop", num_devices=8, data_dir="/data")
  fake_run(tmp_path / "b" / "seed_0", 0, 0.7, learning_rate=0.01)
  groups = find_runs(tmp_path).groups
  assert [(g.label, [r.seed for r in g.runs]) for g in groups] == [
      ("mlp_halving (learning_rate=0.001)", [0, 1, 2]),
      ("mlp_halving (learning_rate=0.01)", [0])]
