"""The places where jaxlab decides an error is the user's: the user's case is one `error:` line
(or a line of the report), and a bug injected at the same place keeps its traceback."""

import json
import os
import subprocess
import sys
import tempfile

import pytest

from jaxlab import data, experiment
from jaxlab.errors import BadValue, DataError, MissingDependency
from jaxlab.rundir.run import Run
from conftest import ROOT, run_main


def error_lines(done):
  return [line for line in done.stderr.splitlines() if line.startswith("error:")]


def assert_a_bug(done, last_line):
  """Status 1, a traceback ending in `last_line`, and no `error:` line."""
  assert done.returncode == 1, done.stderr[-2000:]
  assert "Traceback (most recent call last)" in done.stderr
  assert done.stderr.rstrip().endswith(last_line), done.stderr[-500:]
  assert not error_lines(done)


def fake_runs(root, dataset="mnist", data_dir=None):
  """Two completed runs of one experiment, as their files say (for the report)."""
  for seed, accuracy in ((0, 0.8), (1, 0.9)):
    run = root / "mlp_baseline" / f"seed_{seed}"
    run.mkdir(parents=True)
    config = {"experiment": "mlp_baseline", "dataset": dataset, "epochs": 1, "batch_size": 32,
              "optimizer": "adam", "learning_rate": 0.001, "seed": seed, "data_dir": data_dir}
    (run / "config.json").write_text(json.dumps({"config": config}))
    record = {"epoch": 1, "train_loss": 0.5, "train_accuracy": accuracy, "val_loss": 0.5,
              "val_accuracy": accuracy, "epoch_seconds": 1.0, "eval_seconds": 0.1}
    (run / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    (run / "metrics.json").write_text(json.dumps({
        "status": "completed", "final_val_accuracy": accuracy, "best_val_accuracy": accuracy,
        "epochs_completed": 1, "evaluation": {"final": {"confusion_matrix": [[1, 0], [0, 1]]}}}))


def test_a_data_set_not_at_hand_is_a_line_of_the_report_and_a_bug_in_loading_one_is_not(
    tmp_path, monkeypatch):
  fake_runs(tmp_path / "runs", data_dir=str(tmp_path / "nowhere"))
  done = run_main("report.py", f"--runs={tmp_path / 'runs'}", f"--out={tmp_path / 'report'}")
  assert done.returncode == 0, done.stderr[-2000:]
  (samples,) = json.loads((tmp_path / "report" / "report.json").read_text())["samples"]
  assert samples == {"dataset": "mnist", "file": None,
                     "error": f"--data_dir '{tmp_path / 'nowhere'}' is not a directory"}

  def broken(*args, **kwargs):
    return {}["train_images"]  # A bug in loading data, standing in for any.
  monkeypatch.setattr(data, "load_dataset", broken)
  assert_a_bug(run_main("report.py", f"--runs={tmp_path / 'runs'}", f"--out={tmp_path / 'r2'}"),
               "KeyError: 'train_images'")


def test_a_tfds_copy_it_cannot_read_is_a_warning_and_a_bug_of_jaxlabs_keeps_its_traceback(
    tmp_path, monkeypatch):
  (tmp_path / "mnist" / "3.0.1").mkdir(parents=True)  # A TFDS folder with nothing prepared.
  (tmp_path / "mnist" / "3.0.1" / "dataset_info.json").write_text("{not json")
  done = run_main("train.py", "--experiment=mlp_baseline", f"--data_dir={tmp_path}",
                  f"--workdir={tmp_path / 'run'}")
  assert done.returncode == 2, done.stderr[-2000:]
  assert "a TFDS folder of mnist is there, but TFDS cannot read it" in done.stderr
  assert error_lines(done)[0].startswith("error: data set 'mnist' was not found: put ")

  def broken(tfds_name, data_dir, download):
    return {}["train"]  # jaxlab's own code around TFDS, with a bug.
  monkeypatch.setattr(data, "_tfds_source", broken)
  assert_a_bug(run_main("train.py", "--experiment=mlp_baseline", f"--data_dir={tmp_path}",
                        f"--workdir={tmp_path / 'run2'}"), "KeyError: 'train'")


@pytest.mark.parametrize("source,bug", [
    ("import no_such_package_here\n", None),
    ("from jaxlab.models import NoSuchLayer\n", None),
    ("import sys\nsys.path.insert(0, {folder!r})\nimport broken_helper\n",
     "ImportError: cannot import name 'no_such_name' from 'os' ({os})"),
])
def test_only_an_import_the_lab_file_makes_is_the_files_fault(tmp_path, source, bug):
  """An import of the file's own that fails is one error line naming the file and its line; an
  ImportError raised by code an import ran (a module with a bug: here a helper of the user's,
  as it could be one of jaxlab's) keeps its traceback."""
  (tmp_path / "broken_helper.py").write_text("from os import no_such_name\n")
  lab = tmp_path / "importing_lab.py"
  lab.write_text(source.format(folder=str(tmp_path)))
  done = run_main("train.py", f"--lab={lab}", "--experiment=mlp_baseline",
                  f"--workdir={tmp_path / 'run'}")
  if bug is None:
    assert done.returncode == 2 and len(error_lines(done)) == 1, done.stderr[-2000:]
    assert error_lines(done)[0].startswith(f"error: lab file {lab}, line 1: ")
  else:
    assert_a_bug(done, bug.format(os=os.__file__))


def test_a_benchmark_peer_is_skipped_only_for_a_missing_package(monkeypatch):
  from jaxlab.experiment import resolve_config
  from jaxlab.training.state import setup
  from jaxlab.perf import benchmark
  built = setup(resolve_config("mlp_halving"))
  monkeypatch.setattr(benchmark, "jaxlab_runner", lambda *args, members=1: lambda: 1.0)

  def missing(*args):
    raise MissingDependency("PyTorch is needed for the torch_eager peer")
  monkeypatch.setitem(benchmark.PEERS, "torch_eager", missing)
  result = benchmark.run_benchmark(built, 10, 32, 64, 1, ["torch_eager"], peak_flops=1e9,
                                   log=lambda s: None)
  assert result["results"]["torch_eager"] == {
      "skipped": "PyTorch is needed for the torch_eager peer"}

  def broken(*args):
    raise ImportError("cannot import name 'walk' from 'jaxlab.models'")  # A bug of jaxlab's.
  monkeypatch.setitem(benchmark.PEERS, "torch_eager", broken)
  with pytest.raises(ImportError, match="cannot import name 'walk'"):
    benchmark.run_benchmark(built, 10, 32, 64, 1, ["torch_eager"], peak_flops=1e9,
                            log=lambda s: None)


def test_keras_export_names_an_output_it_cannot_write_and_keeps_a_keras_error(tmp_path,
                                                                             monkeypatch):
  from jaxlab.experiment import build_model
  from jaxlab.keras.model import import_keras
  from jaxlab.keras.weights import export_keras
  from jaxlab.models import abstract_variables
  import jax
  import numpy as np
  model = build_model("mlp_halving")
  variables = jax.tree_util.tree_map(lambda x: np.zeros(x.shape, x.dtype),
                                     abstract_variables(model, model.input_shape()))
  (tmp_path / "a_file").write_text("")
  with pytest.raises(BadValue, match=r"--output .*a_file/m.keras cannot be written"):
    export_keras(model, variables, str(tmp_path / "a_file" / "m.keras"))
  keras = import_keras()

  def failing_save(self, path, *args, **kwargs):
    raise OSError(5, "Input/output error inside Keras")
  monkeypatch.setattr(keras.Model, "save", failing_save)
  with pytest.raises(OSError, match="Input/output error inside Keras") as raised:
    export_keras(model, variables, str(tmp_path / "m.keras"))
  assert not isinstance(raised.value, BadValue)  # Keras's error, not dressed as the user's.


def test_a_damaged_config_json_is_named_as_damaged_not_as_missing(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="it has no config.json"):
    Run.open(tmp_path / "empty")
  (tmp_path / "damaged").mkdir()
  (tmp_path / "damaged" / "config.json").write_text('{"config": {"experiment": "mlp')
  with pytest.raises(DataError, match=r"config.json is damaged \(not JSON: "):
    Run.open(tmp_path / "damaged")
  done = run_main("evaluate.py", f"--workdir={tmp_path / 'damaged'}")
  assert done.returncode == 2 and error_lines(done)[0].startswith(
      f"error: {tmp_path / 'damaged'}/config.json is damaged (not JSON: ")


def test_runs_record_their_lab_file_relative_to_the_project_or_absolute_outside_it(tmp_path):
  about = experiment.describe_experiment("mlp_baseline")
  assert (about["lab"], about["module"], about["declared_in"]) == (
      "lab02", "experiments.lab02", "experiments/lab02.py")
  lab = tmp_path / "outside_lab.py"
  lab.write_text("from jaxlab.experiment import Experiment, register\n"
                 "from jaxlab.models import MLP, Dense\n"
                 "register(Experiment(name='outside_mlp', dataset='mnist', epochs=1, "
                 "model=MLP(layers=(Dense(8),))))\n")
  experiment.load_lab(str(lab))
  about = experiment.describe_experiment("outside_mlp")
  assert about["declared_in"] == str(lab.resolve()) and about["module"] == ""
  assert experiment.recorded_path("experiments/lab02.py") == ROOT / "experiments" / "lab02.py"


@pytest.mark.slow
def test_a_test_run_leaves_no_temporary_folder_behind(tmp_path):
  """The suite's temporary folder goes when the run ends, and a run that was killed before it
  could remove its own has it removed by the next run (its process is gone)."""
  orphan = tmp_path / "jaxlab-tests-999999999-abc"  # No such process.
  (orphan / "cache").mkdir(parents=True)
  env = {k: v for k, v in os.environ.items() if k != "JAXLAB_TEST_TMP"}
  env["TMPDIR"] = str(tmp_path)
  done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p",
                         "no:cacheprovider", "tests/test_layout.py::test_modules_look_only_down"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
  assert not list(tmp_path.glob("jaxlab-tests-*")), list(tmp_path.iterdir())
  assert tempfile.gettempdir() != str(tmp_path)  # This process's own is elsewhere, and kept.
