"""The absl entry points, run as a user runs them."""

import json

import pytest

import keras_models
from conftest import run_main, script
from datafiles import write_idx_dataset


@pytest.mark.slow
def test_summary_json_has_keras_counts():
  out = json.loads(script("summary.py", "--experiment=mlp_back_n_forth", "--json").stdout)
  assert {k: out[k] for k in ("total_params", "trainable_params", "non_trainable_params")} == \
      keras_models.counts(keras_models.build("mlp_back_n_forth"))
  assert [l["name"] for l in out["layers"]][:3] == ["dense", "dense_1", "batch_normalization"]


@pytest.mark.slow
def test_summary_table():
  out = script("summary.py", "--experiment=mlp_baseline").stdout
  assert 'Model: "mlp_baseline"' in out and "Total params:" in out and "dropout (Dropout)" in out


@pytest.mark.parametrize("args,listed", [
    (["--experiment=mlp_nope"], "known experiments: mlp_baseline, mlp_deep"),
    (["--experiment=mlp_baseline", "--dataset=svhn"], "known datasets: mnist, fashion_mnist, cifar10"),
])
def test_unknown_names_list_the_known_ones(args, listed):
  for name in ("summary.py", "train.py"):
    result = run_main(name, *args)
    assert result.returncode == 2, result.stderr
    assert listed in result.stderr and "Traceback" not in result.stderr


def test_jaxlab_traceback_shows_a_user_errors_traceback_too(monkeypatch):
  quiet = run_main("summary.py", "--experiment=mlp_nope")
  monkeypatch.setenv("JAXLAB_TRACEBACK", "1")
  loud = run_main("summary.py", "--experiment=mlp_nope")
  for result in (quiet, loud):
    errors = [l for l in result.stderr.splitlines() if l.startswith("error: ")]
    assert result.returncode == 2 and len(errors) == 1 and "unknown experiment 'mlp_nope'" in \
        errors[0], result.stderr
  assert "Traceback" not in quiet.stderr
  assert "Traceback (most recent call last)" in loud.stderr
  assert "jaxlab.errors.UnknownNameError: unknown experiment 'mlp_nope'" in loud.stderr


def test_errors_a_user_reads_and_bugs_are_told_apart():
  """Only a UserError is the user's: a KeyError or ValueError from inside jaxlab (or JAX) is a
  bug, in a lab record too, with its type; a UserError still is what callers catch it as."""
  from jaxlab import errors
  from jaxlab.registry import Registry
  assert errors.describe(KeyError("per_class")) == "KeyError: 'per_class'"
  assert errors.describe(ValueError("bad shape")) == "ValueError: bad shape"
  assert errors.describe(errors.BadValue("epochs must be\n a positive integer")) == (
      "epochs must be a positive integer")
  with pytest.raises(LookupError) as unknown:
    Registry("thing").get("x")
  assert isinstance(unknown.value, errors.UserError)
  assert str(unknown.value) == "unknown thing 'x'; known things: (none)"  # No KeyError quotes.
  for error, builtin in ((errors.BadValue, ValueError), (errors.MissingFile, FileNotFoundError),
                         (errors.DiskFull, OSError), (errors.OutOfMemory, MemoryError),
                         (errors.MissingDependency, ImportError)):
    assert issubclass(error, builtin) and issubclass(error, errors.UserError)
  assert not issubclass(errors.NonFiniteError, errors.UserError)


@pytest.mark.slow
def test_train_missing_data_says_how_to_provide_it(tmp_path):
  result = script("train.py", "--experiment=mlp_baseline", "--dataset=mnist",
                  f"--data_dir={tmp_path}", f"--workdir={tmp_path / 'run'}", check=False, timeout=60)
  assert result.returncode == 2 and "Traceback" not in result.stderr
  assert "data set 'mnist' was not found" in result.stderr and "--data_dir" in result.stderr


@pytest.mark.slow
def test_train_end_to_end_then_resume(tmp_path):
  write_idx_dataset(tmp_path / "data", n_train=96, n_test=40)
  args = ["--experiment=mlp_halving", "--dataset=mnist", f"--data_dir={tmp_path / 'data'}",
          f"--workdir={tmp_path / 'run'}", "--epochs=2", "--batch_size=32", "--train_limit=64",
          "--learning_rate=0.003", "--optimizer=nadam", "--seed=5", "--progress"]
  first = script("train.py", *args)
  assert "final validation accuracy" in first.stdout and str(tmp_path / "run") in first.stdout
  assert "epoch 2/2" in first.stderr  # The progress bar.
  run = tmp_path / "run"
  config = json.loads((run / "config.json").read_text())["config"]
  assert (config["train_limit"], config["optimizer"], config["seed"], config["learning_rate"]) == \
      (64, "nadam", 5, 0.003)
  lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
  assert [l["epoch"] for l in lines] == [1, 2] and lines[-1]["step"] == 4
  summary = json.loads((run / "metrics.json").read_text())
  assert summary["status"] == "completed"
  # The same command again finds the run complete and trains nothing more.
  again = script("train.py", *args)
  assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
  assert json.loads((run / "metrics.json").read_text())["final_val_accuracy"] == \
      summary["final_val_accuracy"]
  assert "Resuming" in again.stderr
  # A different batch size in the same directory is refused, naming the setting.
  other = script("train.py", *args[:-1], "--batch_size=16", check=False)
  assert other.returncode == 2 and "batch_size: 32 -> 16" in other.stderr


@pytest.mark.slow
def test_stray_arguments_are_refused():
  result = script("summary.py", "--experiment=mlp_baseline", "oops", check=False)
  assert result.returncode == 2 and "unexpected arguments: oops" in result.stderr
