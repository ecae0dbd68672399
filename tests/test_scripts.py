"""The absl entry points, run as a user runs them: each script once as a process of its own
(its exit status and its `error:` line), the rest through its main in this process."""

import json

import pytest

import keras_models
from conftest import ROOT, run_main, start_script
from datafiles import write_idx_dataset


@pytest.mark.slow
def test_every_script_runs_as_a_process_and_says_what_is_wrong(tmp_path):
  """Every script of scripts/, started as a user starts it, given one bad input: status 2 and
  one `error:` line naming the bad value, no traceback. All of them at once."""
  nowhere = tmp_path / "nowhere"
  cases = {
      "train.py": (["--experiment=mlp_nope"], "unknown experiment 'mlp_nope'; known "
                   "experiments: mlp_baseline"),
      "run_lab.py": (["--lab=lab77", f"--workdir={tmp_path / 'lab'}"], "unknown lab 'lab77'"),
      "evaluate.py": ([f"--workdir={nowhere}"], f"{nowhere} is not a run directory"),
      "predict.py": ([f"--workdir={nowhere}", f"--inputs={tmp_path / 'x.npy'}",
                      f"--output={tmp_path / 'p.npy'}"], f"{nowhere} is not a run directory"),
      "export_keras.py": ([f"--workdir={nowhere}", f"--output={tmp_path / 'm.keras'}"],
                          f"{nowhere} is not a run directory"),
      "import_keras.py": (["--experiment=mlp_baseline", f"--keras_weights={nowhere}.h5",
                           f"--workdir={tmp_path / 'run'}"],
                          f"no Keras weights file at {nowhere}.h5"),
      "compare_layers.py": (["--experiment=mlp_baseline", f"--keras_weights={nowhere}.h5"],
                            f"no Keras weights file at {nowhere}.h5"),
      "report.py": ([f"--runs={nowhere}"], f"--runs {nowhere} is not a directory"),
      "summary.py": (["--experiment=mlp_baseline", "--dataset=svhn"], "unknown dataset 'svhn'"),
      "profile_step.py": (["--experiment=mlp_baseline", "--precision=fp8"],
                          "unknown precision 'fp8'; known: float32, bf16"),
      "probe_kernels.py": (["--dtypes=float32,float16"],
                           "unknown dtype 'float16'; known: float32, bfloat16"),
      "benchmark.py": (["--peers=tf"], "unknown peer 'tf'; known: keras_fit, torch_eager"),
      "benchmark_seeds.py": (["--experiment=mlp_baseline", "--seeds=0,x"],
                             "--seeds must be integers separated by commas, got '0,x'"),
      "keras_train.py": (["--experiment=mlp_baseline", "--epochs=0"],
                         "epochs must be a positive integer, got 0"),
      "flag_reference.py": (["--output=flags.md"], "Unknown command line flag 'output'"),
  }
  assert set(cases) == {p.name for p in (ROOT / "scripts").glob("*.py")}
  processes = {name: start_script(name, *args) for name, (args, _) in cases.items()}
  failures = []
  for name, process in processes.items():
    _, stderr = process.communicate(timeout=300)
    errors = [l for l in stderr.splitlines() if l.startswith("error: ")]
    if (process.returncode != 2 or "Traceback" in stderr or len(errors) != 1
        or cases[name][1] not in errors[0]):
      failures.append(f"{name}: status {process.returncode}, stderr:\n{stderr[-1500:]}")
  assert not failures, "\n\n".join(failures)


def test_summary_json_has_keras_counts():
  out = json.loads(run_main("summary.py", "--experiment=mlp_back_n_forth", "--json").stdout)
  assert {k: out[k] for k in ("total_params", "trainable_params", "non_trainable_params")} == \
      keras_models.counts(keras_models.build("mlp_back_n_forth"))
  assert [l["name"] for l in out["layers"]][:3] == ["dense", "dense_1", "batch_normalization"]


def test_summary_table():
  out = run_main("summary.py", "--experiment=mlp_baseline").stdout
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
  things = Registry("thing")
  things.register("skip_cnn", 1)
  things.register("mlp_baseline", 2)
  with pytest.raises(LookupError, match=r"known things: skip_cnn, mlp_baseline; did you mean "
                                        r"'skip_cnn'\?$"):
    things.get("skip_cnnn")  # A typo: the name it is closest to.
  with pytest.raises(LookupError, match=r"known things: skip_cnn, mlp_baseline$"):
    things.get("vgg")  # Nothing close: no guess.
  for error, builtin in ((errors.BadValue, ValueError), (errors.MissingFile, FileNotFoundError),
                         (errors.DiskFull, OSError), (errors.OutOfMemory, MemoryError),
                         (errors.MissingDependency, ImportError)):
    assert issubclass(error, builtin) and issubclass(error, errors.UserError)
  assert not issubclass(errors.NonFiniteError, errors.UserError)


def test_train_missing_data_says_how_to_provide_it(tmp_path):
  result = run_main("train.py", "--experiment=mlp_baseline", "--dataset=mnist",
                    f"--data_dir={tmp_path}", f"--workdir={tmp_path / 'run'}")
  assert result.returncode == 2 and "Traceback" not in result.stderr
  assert "data set 'mnist' was not found" in result.stderr and "--data_dir" in result.stderr


@pytest.mark.slow
def test_train_end_to_end_then_resume(tmp_path):
  write_idx_dataset(tmp_path / "data", n_train=96, n_test=40)
  args = ["--experiment=mlp_halving", "--dataset=mnist", f"--data_dir={tmp_path / 'data'}",
          f"--workdir={tmp_path / 'run'}", "--epochs=2", "--batch_size=32", "--train_limit=64",
          "--learning_rate=0.003", "--optimizer=nadam", "--seed=5", "--progress"]
  first = run_main("train.py", *args)
  assert first.returncode == 0, first.stderr[-3000:]
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
  again = run_main("train.py", *args)
  assert again.returncode == 0, again.stderr[-3000:]
  assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
  assert json.loads((run / "metrics.json").read_text())["final_val_accuracy"] == \
      summary["final_val_accuracy"]
  assert "Resuming" in again.stderr
  # A different batch size in the same directory is refused, naming the setting.
  other = run_main("train.py", *args[:-1], "--batch_size=16")
  assert other.returncode == 2 and "batch_size: 32 -> 16" in other.stderr


def test_stray_arguments_are_refused():
  result = run_main("summary.py", "--experiment=mlp_baseline", "oops")
  assert result.returncode == 2 and "unexpected arguments: oops" in result.stderr
