"""Fault injection: train.py killed, stopped, starved of disk, broken by a bug, fed damaged
checkpoints and NaNs; every interrupted run resumes to the result of an uninterrupted one.

What a process is needed for runs in one (a kill, a signal, a file-size limit, a bug's exit
status, a lab file edited after another process loaded it); the rest, resumes included, runs
train.py's main in this process (`run_main`), which compiles as the scripts do, so a run killed
in a process and resumed here is bit for bit the uninterrupted run."""

import json
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from flax import traverse_util

from jaxlab.rundir import checkpoint, lock
from jaxlab.training import process
from jaxlab.experiment import resolve_config
from jaxlab.training.hooks import Hook
from jaxlab.training.train import group_configs, train_and_evaluate, train_group
from datafiles import write_idx_dataset
from conftest import ROOT, run_main, script, script_environment, start_script

TIMINGS = ("epoch_seconds", "eval_seconds", "time")
EPOCHS = 3


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  directory = tmp_path_factory.mktemp("fault-data")
  write_idx_dataset(directory, n_train=2048, n_test=64)
  return directory


def train_args(data, workdir, *extra, experiment="mlp_baseline"):
  # 128 steps an epoch in compiled calls of 4, a checkpoint every 8 steps: most of a run is
  # spent between checkpoints that are being written.
  return [f"--experiment={experiment}", "--dataset=mnist", f"--data_dir={data}",
          f"--workdir={workdir}", f"--epochs={EPOCHS}", "--batch_size=16",
          "--steps_per_dispatch=4", "--checkpoint_every_steps=8", "--eval_batch_size=64", *extra]


def train_process_after(setup, args):
  """train.py ARGS run as a process of its own, after the Python code `setup` (which breaks
  something) has run in it."""
  code = (f"{setup}import runpy, sys\nsys.argv = ['train.py'] + {list(args)!r}\n"
          "runpy.run_path('scripts/train.py', run_name='__main__')\n")
  return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                        env=script_environment(), timeout=300)


def train(*args):
  """train.py's main in this process; fails with its stderr unless it exits with status 0."""
  done = run_main("train.py", *args)
  assert done.returncode == 0, done.stderr[-3000:]
  return done


def newest_state(workdir):
  """Every array of the newest checkpoint, by path, and its metadata."""
  run_checkpoints = sorted((workdir / "checkpoints").glob("step_*.msgpack"))
  meta, state_dict = checkpoint.read(run_checkpoints[-1])
  return {"/".join(k): np.asarray(v) for k, v in
          traverse_util.flatten_dict(state_dict["state"]).items()}, meta


def metrics_lines(workdir):
  """metrics.jsonl as strict JSON (no NaN), every field but the timings."""
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  records = [json.loads(l, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))
             for l in lines]
  return [{k: v for k, v in r.items() if k not in TIMINGS} for r in records]


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
  """The uninterrupted run: its final state and metrics."""
  workdir = tmp_path_factory.mktemp("reference") / "run"
  train(*train_args(data, workdir))
  state, meta = newest_state(workdir)
  assert meta["step"] == EPOCHS * 128 and meta["epoch"] == EPOCHS
  return state, metrics_lines(workdir)


def assert_same_as_reference(workdir, reference):
  state, _ = newest_state(workdir)
  expected_state, expected_metrics = reference
  assert state.keys() == expected_state.keys()
  for key in state:
    np.testing.assert_array_equal(state[key], expected_state[key], err_msg=key)
  assert metrics_lines(workdir) == expected_metrics
  summary = json.loads((workdir / "metrics.json").read_text())
  assert summary["status"] == "completed" and summary["epochs_completed"] == EPOCHS


def wait_for(predicate, process, timeout=120):
  deadline = time.monotonic() + timeout
  while not predicate():
    assert process.poll() is None, process.communicate()[1][-3000:]
    assert time.monotonic() < deadline, "timed out"
    time.sleep(0.005)


def saved_steps(workdir):
  return sorted(int(p.name[5:14]) for p in (workdir / "checkpoints").glob("step_*.msgpack")
                ) if (workdir / "checkpoints").is_dir() else []


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_at_a_random_moment_then_resume(data, reference, tmp_path, seed):
  """Killed after a random number of checkpoints, a random time later (inside an epoch, often
  while a checkpoint is being written), then resumed: bit-identical to the uninterrupted run."""
  rng = random.Random(seed)
  workdir = tmp_path / "run"
  process = start_script("train.py", *train_args(data, workdir))
  after = rng.randrange(1, 3 * 128 // 8 - 2)  # Checkpoints to wait for before the kill.
  wait_for(lambda: len(saved_steps(workdir)) and saved_steps(workdir)[-1] >= 8 * after, process)
  time.sleep(rng.uniform(0, 0.05))
  process.send_signal(signal.SIGKILL)
  process.communicate()
  killed_at = saved_steps(workdir)[-1]
  assert killed_at < EPOCHS * 128, "the run ended before the kill"
  train(*train_args(data, workdir))
  assert_same_as_reference(workdir, reference)
  assert not list((workdir / "checkpoints").glob("*.tmp*"))


@pytest.mark.slow
def test_sigterm_saves_stops_and_resumes(data, reference, tmp_path):
  workdir = tmp_path / "run"
  process = start_script("train.py", *train_args(data, workdir))
  wait_for(lambda: len(saved_steps(workdir)) and saved_steps(workdir)[-1] >= 136, process)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 75, stderr[-2000:]
  assert "SIGTERM: stopping at the next step boundary" in stderr
  line = next(l for l in stderr.splitlines() if l.startswith("stopped in epoch"))
  stopped_at = saved_steps(workdir)[-1]
  assert f"(global step {stopped_at})" in line and f"step_{stopped_at:09d}.msgpack" in line
  assert "resume with the same command: python3 " in stderr
  resumed = train(*train_args(data, workdir))
  assert f"Resuming {workdir} from step {stopped_at}" in resumed.stderr
  assert_same_as_reference(workdir, reference)


def truncate(path):
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_a_bit(path):
  raw = bytearray(path.read_bytes())
  raw[len(raw) // 2] ^= 0x10
  path.write_bytes(bytes(raw))


@pytest.mark.slow
@pytest.mark.parametrize("damage", [truncate, flip_a_bit])
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(data, reference, tmp_path,
                                                                  damage):
  workdir = tmp_path / "run"
  train(*train_args(data, workdir, "--epochs=2"))
  newest = workdir / "checkpoints" / f"step_{2 * 128:09d}.msgpack"
  damage(newest)
  resumed = train(*train_args(data, workdir))
  assert f"checkpoint {newest} is corrupt" in resumed.stderr or (
      f"checkpoint {newest} is not a readable msgpack file" in resumed.stderr)
  assert f"Resuming {workdir} from step {2 * 128 - 8}" in resumed.stderr
  assert_same_as_reference(workdir, reference)


@pytest.mark.slow
def test_a_checkpoint_of_another_experiment_is_refused(data, tmp_path):
  other = tmp_path / "other"
  train(*train_args(data, other, "--epochs=1", experiment="mlp_halving"))
  workdir = tmp_path / "run"
  train(*train_args(data, workdir, "--epochs=1"))
  stray = workdir / "checkpoints" / "step_000000500.msgpack"
  stray.write_bytes((other / "checkpoints" / "step_000000128.msgpack").read_bytes())
  refused = run_main("train.py", *train_args(data, workdir))
  assert refused.returncode == 2 and "Traceback" not in refused.stderr
  assert (f"error: checkpoint {stray} belongs to experiment 'mlp_halving' (config "
          in refused.stderr)
  assert "not to this run's 'mlp_baseline'" in refused.stderr and "--restart" in refused.stderr
  train(*train_args(data, workdir, "--restart"))
  assert not stray.exists()
  assert [r["epoch"] for r in metrics_lines(workdir)] == [1, 2, 3]


@pytest.mark.slow
def test_an_edited_declaration_is_refused_unless_restarted(data, tmp_path):
  lab = tmp_path / "edited_lab.py"
  declaration = ("from jaxlab.experiment import Experiment, register\n"
                 "from jaxlab.models import MLP, Dense\n"
                 "register(Experiment(name='fault_edited', dataset='mnist', epochs=3, "
                 "model=MLP(layers=(Dense(32, 'relu', batch_norm=True, dropout={rate}),))))\n")
  lab.write_text(declaration.format(rate=0.2))
  workdir = tmp_path / "lab"
  args = [f"--lab={lab}", f"--workdir={workdir}", f"--data_dir={data}", "--epochs=1",
          "--batch_size=64", "--steps_per_dispatch=8"]
  script("run_lab.py", *args)  # A process: this one then loads the edited file, as new.
  lab.write_text(declaration.format(rate=0.3))
  again = run_main("run_lab.py", *args[:-2], "--epochs=2", "--batch_size=64",
                   "--steps_per_dispatch=8")
  assert again.returncode == 1
  error = json.loads((workdir / "lab.json").read_text())["runs"][0]["error"]
  assert "was written for another architecture of 'fault_edited'" in error
  assert "layer 'dropout': rate 0.2 -> 0.3" in error and "--restart" in error
  run = workdir / "fault_edited" / "seed_0"
  train(f"--lab={lab}", "--experiment=fault_edited", "--dataset=mnist", f"--data_dir={data}",
        f"--workdir={run}", "--epochs=2", "--batch_size=64", "--steps_per_dispatch=8",
        "--restart")
  config = json.loads((run / "config.json").read_text())
  assert {"name": "dropout", "type": "Dropout", "rate": 0.3} in config["model"]["layers"]
  assert [r["epoch"] for r in metrics_lines(run)] == [1, 2]


@pytest.mark.slow
def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(data, tmp_path):
  """SGD at rate 2 diverges after some 150 steps: the run stops there, keeps only finite
  checkpoints from before that step, and resumes with --nan_policy=skip."""
  workdir = tmp_path / "run"
  args = train_args(data, workdir, "--epochs=2", "--optimizer=sgd", "--learning_rate=2")
  stopped = run_main("train.py", *args)
  assert stopped.returncode == 3, stopped.stderr[-2000:]
  message = next(l for l in stopped.stderr.splitlines() if l.startswith("error: "))
  epoch, step, bad_step = map(int, re.fullmatch(
      r"error: non-finite loss or gradient at epoch (\d+), step (\d+) of 128 \(global step "
      r"(\d+)\); the run stopped, and the checkpoints it saved before that step stay in "
      r".*/checkpoints\. Lower --learning_rate, or resume with --nan_policy=skip to drop such "
      r"steps", message).groups())
  assert bad_step == (epoch - 1) * 128 + step > 8
  saved = saved_steps(workdir)
  assert saved and saved[-1] < bad_step
  for step in saved:  # Every checkpoint it kept holds finite numbers only.
    _, state_dict = checkpoint.read(workdir / "checkpoints" / f"step_{step:09d}.msgpack")
    leaves = traverse_util.flatten_dict(state_dict["state"]).values()
    assert all(np.all(np.isfinite(np.asarray(x, float))) for x in leaves)
  skipped = train(*args, "--nan_policy=skip")
  assert f"Resuming {workdir} from step {saved[-1]}" in skipped.stderr
  records = metrics_lines(workdir)  # Strict JSON: a NaN would have failed here.
  assert [r["epoch"] for r in records] == [1, 2]
  assert sum(r["skipped_steps"] for r in records) > 0
  assert "skipped_steps=" in skipped.stderr
  json.loads((workdir / "metrics.json").read_text(),
             parse_constant=lambda c: pytest.fail(f"{c} in metrics.json"))


@pytest.mark.slow
def test_a_half_written_metrics_line_is_skipped(data, reference, tmp_path):
  """The torn line a crash leaves when it cuts a metrics line's write short."""
  workdir = tmp_path / "run"
  train(*train_args(data, workdir, "--epochs=1"))
  with open(workdir / "metrics.jsonl", "a") as f:
    f.write('{"epoch": 2, "step": 256, "train_lo')
  resumed = train(*train_args(data, workdir))
  assert "skipped its last line, which is not complete JSON" in resumed.stderr
  assert_same_as_reference(workdir, reference)


@pytest.mark.slow
def test_a_bug_is_a_traceback_and_status_1_and_leaves_the_run_resumable(data, reference,
                                                                          tmp_path):
  """An exception that is no UserError, raised inside training (a KeyError in the final
  evaluation's report, standing in for a bug): its full traceback and status 1, never an
  `error:` line; the run directory stays resumable, and the same command then finishes it as
  the uninterrupted run."""
  workdir = tmp_path / "run"
  bug = train_process_after("import jaxlab.metrics\n"
                            "def report(*args, **kwargs):\n  return {}['per_class']\n"
                            "jaxlab.metrics.report = report\n", train_args(data, workdir))
  assert bug.returncode == 1, bug.stderr[-2000:]
  assert "Traceback (most recent call last)" in bug.stderr
  assert bug.stderr.rstrip().endswith("KeyError: 'per_class'")
  assert 'in _final_evaluations' in bug.stderr  # Where it was raised, not only what.
  assert not [l for l in bug.stderr.splitlines() if l.startswith("error:")]
  resumed = run_main("train.py", *train_args(data, workdir))
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert_same_as_reference(workdir, reference)


@pytest.mark.slow
def test_a_full_disk_keeps_the_previous_checkpoint(data, tmp_path):
  """The file-size limit makes every write past 200 kB fail (EFBIG) as a full disk would."""
  workdir = tmp_path / "run"
  train(*train_args(data, workdir, "--epochs=1"))
  before = {p.name: p.read_bytes() for p in (workdir / "checkpoints").iterdir()}
  full = train_process_after("import resource, signal\n"
                             "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
                             "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))\n",
                             train_args(data, workdir, "--epochs=2"))
  assert full.returncode == 2, full.stderr[-2000:]
  assert "error: could not write checkpoint" in full.stderr
  assert "File too large; the checkpoints written before it are intact" in full.stderr
  for name, data_bytes in before.items():  # Untouched, and still valid.
    assert (workdir / "checkpoints" / name).read_bytes() == data_bytes
    checkpoint.read(workdir / "checkpoints" / name)
  assert not list((workdir / "checkpoints").glob("*.tmp*"))


@pytest.mark.slow
def test_bad_input_is_one_line_and_status_2(data, tmp_path):
  """Every bad input a script can get, each a one-line `error:` naming the bad value, status 2.
  Each case runs the script's main in this process, as its command line would (each script as
  a process, bad input and all: tests/test_scripts.py)."""
  from datafiles import idx_bytes
  from jaxlab.experiment import resolve_config
  from jaxlab.training.train import train_and_evaluate
  from datafiles import synthetic_dataset

  run = tmp_path / "run"
  train_and_evaluate(resolve_config("mlp_baseline", dataset="mnist", epochs=1, batch_size=64,
                                    eval_batch_size=64), run, dataset=synthetic_dataset())
  np.save(tmp_path / "ints.npy", np.zeros((2, 784), np.int64))
  bad_dirs = {}
  for name, change in (("size", lambda d: (d / "train-images-idx3-ubyte.gz").write_bytes(
                           __import__("gzip").compress(idx_bytes(np.zeros((5, 28, 28)))[:-7]))),
                       ("magic", lambda d: (d / "train-images-idx3-ubyte.gz").write_bytes(
                           (d / "train-labels-idx1-ubyte.gz").read_bytes())),
                       ("format", lambda d: (d / "t10k-labels-idx1-ubyte.gz").write_bytes(
                           b"\x1f\x8b not really gzip"))):
    bad_dirs[name] = tmp_path / f"data-{name}"
    write_idx_dataset(bad_dirs[name], n_train=8, n_test=8)
    change(bad_dirs[name])
  (tmp_path / "a_file").write_text("not a directory")
  base = ["--experiment=mlp_baseline", "--dataset=mnist", f"--data_dir={data}",
          f"--workdir={tmp_path / 'w'}"]
  cases = {
      "experiment": ("train.py", ["--experiment=mlp_nope"], "unknown experiment 'mlp_nope'; "
                     "known experiments: mlp_baseline"),
      "dataset": ("train.py", [*base, "--dataset=svhn"], "unknown dataset 'svhn'; known "
                  "datasets: mnist, fashion_mnist, cifar10"),
      "optimizer": ("train.py", [*base, "--optimizer=adamw2"], "unknown optimizer 'adamw2'; "
                    "known optimizers: adam, sgd"),
      "precision": ("train.py", [*base, "--precision=fp8"], "unknown precision 'fp8'; known: "
                    "float32, bf16"),
      "nan_policy": ("train.py", [*base, "--nan_policy=ignore"], "unknown nan_policy 'ignore'; "
                     "known: stop, skip"),
      "epochs": ("train.py", [*base, "--epochs=0"], "epochs must be a positive integer, got 0"),
      "batch_size": ("train.py", [*base, "--batch_size=-3"], "batch_size must be a positive "
                     "integer, got -3"),
      "learning_rate": ("train.py", [*base, "--learning_rate=0"], "learning_rate must be a "
                        "positive number, got 0.0"),
      "train_limit": ("train.py", [*base, "--train_limit=0"], "train_limit must be a positive "
                      "integer, got 0"),
      "keep_checkpoints": ("train.py", [*base, "--keep_checkpoints=0"], "keep_checkpoints must "
                           "be a positive integer, got 0"),
      "not_a_number": ("train.py", [*base, "--epochs=three"], "flag --epochs=three: invalid "
                       "literal for int()"),
      "data_dir": ("train.py", [*base, f"--data_dir={tmp_path / 'nowhere'}"],
                   f"--data_dir '{tmp_path / 'nowhere'}' is not a directory"),
      "file_size": ("train.py", [*base, f"--data_dir={bad_dirs['size']}"],
                    f"{bad_dirs['size'] / 'train-images-idx3-ubyte.gz'}: "),
      "magic": ("train.py", [*base, f"--data_dir={bad_dirs['magic']}"],
                f"{bad_dirs['magic'] / 'train-images-idx3-ubyte.gz'}: bad IDX magic number 2049,"
                " expected 2051"),
      "format": ("train.py", [*base, f"--data_dir={bad_dirs['format']}"],
                 f"{bad_dirs['format'] / 't10k-labels-idx1-ubyte.gz'}: corrupt gzip data"),
      "workdir_file": ("train.py", [*base[:-1], f"--workdir={tmp_path / 'a_file'}"],
                       f"--workdir {tmp_path / 'a_file'} is a file, not a directory"),
      "workdir_unwritable": ("train.py", [*base[:-1], "--workdir=/sys/jaxlab-run"],
                             "--workdir /sys/jaxlab-run cannot be written"),
      "checkpoint_name": ("evaluate.py", [f"--workdir={run}", "--checkpoint=middle"],
                          "flag --checkpoint=middle: value should be one of <best|last>"),
      "not_a_run": ("evaluate.py", [f"--workdir={tmp_path}"], f"{tmp_path} is not a run "
                    "directory: it has no config.json"),
      "predict_dtype": ("predict.py", [f"--workdir={run}", f"--inputs={tmp_path / 'ints.npy'}",
                                       f"--output={tmp_path / 'p.npy'}"],
                        "--inputs has dtype int64; the model takes float32 inputs"),
      "report_runs": ("report.py", [f"--runs={tmp_path / 'nowhere'}"],
                      f"--runs {tmp_path / 'nowhere'} is not a directory"),
  }
  failures = []

  def check(name, status, stderr):
    errors = [l for l in stderr.splitlines() if l.startswith("error: ")]
    if (status != 2 or "Traceback" in stderr or len(errors) != 1
        or cases[name.split(" ")[0]][2] not in errors[0]):
      failures.append(f"{name}: status {status}, stderr:\n{stderr[-1500:]}")

  for name, (s, args, _) in cases.items():
    result = run_main(s, *args)
    check(name, result.returncode, result.stderr)
  assert not failures, "\n\n".join(failures)


class StopInValidation(Hook):
  """Asks for a stop (as a signal does) once epoch `epoch` is trained, before its validation."""

  def __init__(self, epoch):
    self.epoch = epoch

  def on_epoch_trained(self, epoch, state, sums):
    if epoch == self.epoch:
      process.request()


def config_of(data, **changes):
  """train_args's settings, for the loop called in this process."""
  return resolve_config("mlp_baseline", **{"dataset": "mnist", "data_dir": str(data),
                                           "epochs": EPOCHS, "batch_size": 16,
                                           "steps_per_dispatch": 4, "checkpoint_every_steps": 8,
                                           "eval_batch_size": 64, **changes})


@pytest.mark.slow
def test_a_stop_during_a_validation_resumes_with_that_validation(data, reference, tmp_path):
  """The state of epoch 2's end is on disk before its validation starts; a stop asked for then
  ends the run there, and the resumed run validates epoch 2 and goes on as the uninterrupted
  run."""
  workdir = tmp_path / "run"
  try:
    with pytest.raises(process.Preempted, match=r"stopped in the validation of epoch 2 \(global "
                                                r"step 256\); its checkpoint is .*step_000000256"):
      train_and_evaluate(config_of(data), workdir, hooks=[StopInValidation(2)])
  finally:
    process.clear()
  assert [r["epoch"] for r in metrics_lines(workdir)] == [1]
  assert saved_steps(workdir)[-1] == 256
  resumed = train(*train_args(data, workdir))
  assert f"Resuming {workdir} from step 256" in resumed.stderr
  assert_same_as_reference(workdir, reference)


@pytest.mark.slow
def test_a_group_stopped_during_a_validation_resumes_as_the_uninterrupted_group(data, tmp_path):
  configs = group_configs(config_of(data, epochs=2), seeds=[0, 1])
  dirs = lambda root: [root / "seed_0", root / "seed_1"]
  train_group(configs, dirs(tmp_path / "straight"))
  try:
    with pytest.raises(process.Preempted, match="in the validation of epoch 1"):
      train_group(configs, dirs(tmp_path / "stopped"), hooks=[[StopInValidation(1)], []])
  finally:
    process.clear()
  train_group(configs, dirs(tmp_path / "stopped"))
  for resumed, straight in zip(dirs(tmp_path / "stopped"), dirs(tmp_path / "straight")):
    state, _ = newest_state(resumed)
    expected, _ = newest_state(straight)
    for key in expected:
      np.testing.assert_array_equal(state[key], expected[key], err_msg=key)
    assert metrics_lines(resumed) == metrics_lines(straight)


@pytest.mark.slow
def test_sigterm_in_a_long_validation_exits_at_once_and_resumes_with_it(data, reference,
                                                                        tmp_path):
  """A validation that holds the main thread (as a compiled call of a large model does: here a
  minute's sleep, after the process signals itself): SIGTERM still ends the process within
  seconds, with status 75, once the epoch's checkpoint is on disk; the resumed run validates
  the epoch and ends as the uninterrupted run."""
  workdir = tmp_path / "run"
  slow = ("import os, signal, time\nimport jaxlab.training.train\n"
          "def evaluate_group(*args, **kwargs):\n"
          "  os.kill(os.getpid(), signal.SIGTERM)\n  time.sleep(60)\n"
          "jaxlab.training.train.evaluate_group = evaluate_group\n")
  started = time.monotonic()
  stopped = train_process_after(slow, train_args(data, workdir))
  assert stopped.returncode == 75, stopped.stderr[-2000:]
  assert time.monotonic() - started < 45  # The sleep alone would take 60 s.
  assert "SIGTERM: stopping now, in the validation of epoch 1 (global step 128)." in stopped.stderr
  assert (f"stopped in the validation of epoch 1 (global step 128); its checkpoint is "
          f"{workdir / 'checkpoints' / 'step_000000128.msgpack'}") in stopped.stderr
  assert "resume with the same command: python3 " in stopped.stderr
  assert not (workdir / "metrics.jsonl").read_text()
  assert not (workdir / lock.LOCK_FILE).read_text()  # A clean stop leaves no stale holder.
  resumed = train(*train_args(data, workdir))
  assert f"Resuming {workdir} from step 128" in resumed.stderr
  assert "taking over the lock" not in resumed.stderr
  assert_same_as_reference(workdir, reference)


@pytest.mark.slow
def test_sigint_then_a_second_signal_aborts_at_once_and_the_last_checkpoint_stays(
    data, reference, tmp_path):
  """Ctrl-C asks for a stop; a second one, while that stop's checkpoint is being written (each
  write after the first made to take 5 s here), aborts at once with 128 + SIGINT, without that
  checkpoint: the ones written before are intact and the run resumes from them to the
  uninterrupted result."""
  workdir = tmp_path / "run"
  slow = ("import time\nimport jaxlab.rundir.checkpoint\nsave = jaxlab.rundir.checkpoint.save\n"
          "saves = []\n"
          "def slow_save(*args, **kwargs):\n  if saves:\n    time.sleep(5)\n  saves.append(1)\n"
          "  return save(*args, **kwargs)\n"
          "jaxlab.rundir.checkpoint.save = slow_save\n")
  code = (f"{slow}import runpy, sys\nsys.argv = ['train.py'] + "
          f"{train_args(data, workdir)!r}\nrunpy.run_path('scripts/train.py', run_name='__main__')\n")
  process = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=script_environment(),
                             stderr=subprocess.PIPE, text=True)
  wait_for(lambda: saved_steps(workdir), process)  # The first checkpoint is written.
  process.send_signal(signal.SIGINT)
  time.sleep(1)  # The stop's own checkpoint is now being written, for 5 s.
  process.send_signal(signal.SIGINT)
  _, stderr = process.communicate(timeout=60)
  assert process.returncode == 128 + signal.SIGINT, stderr[-2000:]
  assert "SIGINT: stopping at the next step boundary" in stderr
  assert "SIGINT again: aborting now, without a checkpoint." in stderr
  kept = saved_steps(workdir)
  for step in kept:  # Every checkpoint left is whole.
    checkpoint.read(workdir / "checkpoints" / f"step_{step:09d}.msgpack")
  resumed = train(*train_args(data, workdir))
  assert f"Resuming {workdir} from step {kept[-1]}" in resumed.stderr
  assert_same_as_reference(workdir, reference)
