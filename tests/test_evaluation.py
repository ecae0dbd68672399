"""Confusion matrices and per-class accuracy, in metrics.json and from scripts/evaluate.py."""

import json

import numpy as np
import pytest

from jaxlab import metrics
from jaxlab.experiment import resolve_config
from jaxlab.data import DATASETS
from jaxlab.training.train import train_and_evaluate
from datafiles import synthetic_dataset, write_idx_dataset
from conftest import run_main


def test_confusion_matrix_counts_pairs():
  labels = np.array([0, 0, 1, 2, 2, 2])
  preds = np.array([0, 1, 1, 2, 0, 2])
  matrix = metrics.confusion_matrix(labels, preds, 3)
  expected = np.zeros((3, 3), int)
  for t, p in zip(labels, preds):
    expected[t, p] += 1
  np.testing.assert_array_equal(matrix, expected)
  r = metrics.report(labels, preds, ["a", "b", "c"])
  assert r["per_class_accuracy"] == {"a": 0.5, "b": 1.0, "c": pytest.approx(2 / 3)}
  assert r["accuracy"] == pytest.approx(4 / 6)
  r = metrics.report(np.array([0]), np.array([0]), ["a", "b"])
  assert r["per_class_accuracy"]["b"] is None  # No example of class b: no accuracy.


# Adam at 1e-3: the last epoch is the best (the final state's report serves both). SGD at 3:
# the first epoch reaches about 0.69, then the run falls apart (0.12-0.14), so the best
# checkpoint is an earlier one and its report is computed from that checkpoint.
@pytest.mark.slow
@pytest.mark.parametrize("optimizer,learning_rate,best_epoch", [("adam", 1e-3, 3),
                                                                ("sgd", 3.0, 1)])
def test_metrics_json_holds_final_and_best_reports(tmp_path, optimizer, learning_rate,
                                                   best_epoch):
  config = resolve_config("mlp_baseline", dataset="fashion_mnist", epochs=3, batch_size=32,
                          eval_batch_size=50, steps_per_dispatch=4, learning_rate=learning_rate,
                          optimizer=optimizer)
  ds = synthetic_dataset("fashion_mnist", n_test=130)
  summary = train_and_evaluate(config, tmp_path, dataset=ds)
  names = DATASETS.get("fashion_mnist").class_names
  history = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert summary["best_epoch"] == best_epoch, [r["val_accuracy"] for r in history]
  for which, epoch in (("final", 3), ("best", summary["best_epoch"])):
    r = summary["evaluation"][which]
    matrix = np.array(r["confusion_matrix"])
    assert matrix.shape == (10, 10) and matrix.sum() == 130 == r["examples"]
    assert r["epoch"] == epoch
    assert np.trace(matrix) / 130 == pytest.approx(history[epoch - 1]["val_accuracy"])
    np.testing.assert_array_equal(matrix.sum(1), np.bincount(ds.test_labels, minlength=10))
    assert list(r["per_class_accuracy"]) == list(names)
  assert json.loads((tmp_path / "metrics.json").read_text())["evaluation"] == summary["evaluation"]


@pytest.mark.slow
def test_evaluate_script_recomputes_the_report(tmp_path):
  write_idx_dataset(tmp_path / "data", n_train=64, n_test=40)
  run = tmp_path / "run"
  trained = run_main("train.py", "--experiment=mlp_halving", "--dataset=fashion_mnist",
                     f"--data_dir={tmp_path / 'data'}", f"--workdir={run}", "--epochs=2",
                     "--batch_size=32")
  assert trained.returncode == 0, trained.stderr[-3000:]
  stored = json.loads((run / "metrics.json").read_text())["evaluation"]
  for which, key in (("best", "best"), ("last", "final")):
    done = run_main("evaluate.py", f"--workdir={run}", f"--checkpoint={which}", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    assert out["confusion_matrix"] == stored[key]["confusion_matrix"]
    assert out["epoch"] == stored[key]["epoch"]
  table = run_main("evaluate.py", f"--workdir={run}").stdout
  assert "Ankle boot" in table and "T-shirt/top" in table and "on 40 examples" in table
  missing = run_main("evaluate.py", f"--workdir={tmp_path / 'none'}")
  assert missing.returncode == 2 and "not a run directory" in missing.stderr
