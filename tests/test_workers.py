"""One writer per run directory, and labs shared by many workers: no run trained twice, a dead
worker's run taken over, --workers on one machine."""

import json
import logging
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from jaxlab.rundir import lock
from jaxlab.files import read_jsonl
from datafiles import write_idx_dataset
from conftest import ROOT, run_main, script, script_environment, start_script

pytestmark = pytest.mark.slow

FOUR = """
from jaxlab.experiment import Experiment, register
from jaxlab.models import MLP, Dense

for i, width in enumerate((16, 24, 32, 40)):
  register(Experiment(name=f"workers_{{i}}_{tag}", dataset="mnist", epochs=2, batch_size=32,
                      model=MLP(layers=(Dense(width, "relu", batch_norm=True, dropout=0.2),))))
"""


def hold_in_another_process(directory):
  """A process that holds `directory`'s lock until killed (and its pid)."""
  code = (f"import time; from jaxlab.rundir import lock; lock.acquire({str(directory)!r}); "
          "print('held', flush=True); time.sleep(600)")
  holder = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True, env=script_environment())
  assert holder.stdout.readline().strip() == "held"
  return holder


def test_a_busy_run_directory_is_refused_naming_its_holder_and_a_dead_ones_is_taken(
    tmp_path, caplog):
  holder = hold_in_another_process(tmp_path / "run")
  try:
    with pytest.raises(lock.BusyError, match=rf"run directory .*run is being written by process "
                       rf"{holder.pid} on \S+ \(since "):
      lock.acquire(tmp_path / "run")
    assert lock.holder_of(tmp_path / "run")["pid"] == holder.pid
    write_idx_dataset(tmp_path / "data", n_train=64, n_test=32)
    refused = run_main("train.py", "--experiment=mlp_halving", f"--workdir={tmp_path / 'run'}",
                       "--dataset=mnist", f"--data_dir={tmp_path / 'data'}", "--epochs=1")
    assert refused.returncode == 2
    errors = [l for l in refused.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(
        f"error: run directory {tmp_path / 'run'} is being written by process {holder.pid} on ")
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  assert lock.holder_of(tmp_path / "run") is None  # The system released it with the process.
  with caplog.at_level(logging.WARNING):
    lock.acquire(tmp_path / "run")
  assert f"taking over the lock of process {holder.pid}" in caplog.text
  lock.acquire(tmp_path / "run")  # Its holder may take it again.
  lock.release(tmp_path / "run")
  lock.release(tmp_path / "run")
  assert (tmp_path / "run" / lock.LOCK_FILE).read_text() == ""  # Released: no holder left.


def test_a_second_train_py_on_a_busy_run_exits_2_naming_the_holder(tmp_path):
  write_idx_dataset(tmp_path / "data", n_train=512, n_test=64)
  args = ["--experiment=mlp_halving", "--dataset=mnist", f"--data_dir={tmp_path / 'data'}",
          f"--workdir={tmp_path / 'run'}", "--batch_size=8", "--steps_per_dispatch=1"]
  first = start_script("train.py", *args, "--epochs=40", stdout=subprocess.DEVNULL)
  try:
    deadline = time.time() + 120
    while not (tmp_path / "run" / "metrics.jsonl").exists():  # Training, the lock held.
      assert first.poll() is None and time.time() < deadline, first.stderr.read()
      time.sleep(0.2)
    # Python's import log on: the refusal comes before JAX (and the data) would load.
    second = script("train.py", *args, "--epochs=1", check=False,
                    env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert second.returncode == 2
    assert (f"error: run directory {tmp_path / 'run'} is being written by process {first.pid}"
            in second.stderr)
    imported = [l.rsplit("|", 1)[-1].strip() for l in second.stderr.splitlines()
                if l.startswith("import time:")]
    assert "jaxlab.cli" in imported and "jax" not in imported
  finally:
    first.send_signal(signal.SIGKILL)
    first.wait()


def four_experiment_lab(tmp_path, tag):
  data = tmp_path / "data"
  write_idx_dataset(data, n_train=160, n_test=48)
  lab = tmp_path / f"workers_{tag}.py"
  lab.write_text(textwrap.dedent(FOUR.format(tag=tag)))
  return ["--lab=" + str(lab), f"--data_dir={data}", "--seeds=0,1", "--steps_per_dispatch=2",
          "--eval_batch_size=48", "--checkpoint_every_steps=2"]


def lab_runs(workdir):
  return json.loads((workdir / "lab.json").read_text())["runs"]


def assert_trained_once(workdir, runs=8, epochs=2):
  records = lab_runs(workdir)
  assert len(records) == runs and {r["status"] for r in records} == {"completed"}
  for r in records:
    assert [e["epoch"] for e in read_jsonl(workdir / r["path"] / "metrics.jsonl")] == list(
        range(1, epochs + 1)), r["path"]
  return records


def final_metrics(workdir):
  return {r["path"]: (r["final_val_accuracy"], r["best_val_accuracy"])
          for r in lab_runs(workdir)}


@pytest.fixture(scope="module")
def one_process_lab(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("one")
  args = four_experiment_lab(tmp, "shared")
  done = run_main("run_lab.py", *args, f"--workdir={tmp / 'lab'}")
  assert done.returncode == 0, done.stderr[-3000:]
  return final_metrics(tmp / "lab"), args


def test_two_workers_share_a_lab_and_train_every_run_once(tmp_path, one_process_lab):
  reference, args = one_process_lab
  workdir = tmp_path / "lab"
  workers = [start_script("run_lab.py", *args, f"--workdir={workdir}") for _ in range(2)]
  out = [w.communicate(timeout=600) for w in workers]
  assert [w.returncode for w in workers] == [0, 0], [o[1][-2000:] for o in out]
  records = assert_trained_once(workdir)
  assert {r["worker"]["pid"] for r in records} == {w.pid for w in workers}
  assert final_metrics(workdir) == reference  # As one process trains them, bit for bit.
  # The last one out prints the table; both say how the lab stands.
  assert [("workers_3_shared" in o[0]) for o in out].count(True) == 1
  assert all("8 of 8 runs completed" in o[0] for o in out)
  assert json.loads((workdir / "lab.json").read_text())["workers"] == []


def finished(run):
  """Whether the run's own files say it completed."""
  summary = run / "metrics.json"
  return summary.exists() and json.loads(summary.read_text()).get("status") == "completed"


def newest_step(run):
  steps = [int(p.name[5:14]) for p in (run / "checkpoints").glob("step_*.msgpack")]
  return max(steps, default=0)


def test_a_killed_workers_run_is_taken_over_by_the_other(tmp_path, one_process_lab):
  """The first worker is frozen (SIGSTOP) at a moment it holds a group with a checkpoint and
  the second has joined the lab, then killed: the second takes that group over, resuming each
  of its runs from the first's checkpoint, and the lab ends as one process trains it."""
  reference, args = one_process_lab
  workdir = tmp_path / "lab"
  first = start_script("run_lab.py", *args, f"--workdir={workdir}", stdout=subprocess.DEVNULL)
  second = None
  deadline = time.time() + 300
  while True:
    assert first.poll() is None and time.time() < deadline, first.stderr.read()
    if second is None and (workdir / "lab.json").exists():
      second = start_script("run_lab.py", *args, f"--workdir={workdir}")
    joined = second is not None and second.pid in {
        w.get("pid") for w in json.loads((workdir / "lab.json").read_text()).get("workers", [])}
    if joined:
      first.send_signal(signal.SIGSTOP)  # Nothing moves now: what it holds can be read.
      held = {r["path"]: newest_step(workdir / r["path"]) for r in lab_runs(workdir)
              if r["status"] == "running" and r.get("worker", {}).get("pid") == first.pid
              and not finished(workdir / r["path"])}  # Not done but for lab.json's line.
      if held and all(held.values()):
        break
      first.send_signal(signal.SIGCONT)
    time.sleep(0.02)
  first.send_signal(signal.SIGKILL)
  first.wait()
  out, err = second.communicate(timeout=600)
  assert second.returncode == 0, err[-3000:]
  records = {r["path"]: r for r in assert_trained_once(workdir)}
  for path in held:
    assert records[path]["worker"]["pid"] == second.pid, path
    # A group resumes from the newest step all its members had saved (the first may have been
    # frozen between two members' saves).
    step = min(s for p, s in held.items() if p.split("/")[0] == path.split("/")[0])
    resumed = re.search(rf"Resuming {re.escape(str(workdir / path))} from step (\d+)", err)
    assert resumed and int(resumed.group(1)) >= step, (path, step, err[-3000:])
  assert final_metrics(workdir) == reference  # Resumed bit for bit.
  assert "workers_0_shared" in out  # The last one out prints the table.


def test_workers_flag_splits_the_cores_stops_on_sigterm_and_resumes(tmp_path, one_process_lab):
  reference, args = one_process_lab
  workdir = tmp_path / "lab"
  command = [*args, f"--workdir={workdir}", "--workers=2"]
  parent = start_script("run_lab.py", *command, stdout=subprocess.DEVNULL)
  seen = []
  for line in parent.stderr:
    seen.append(line)
    if "final validation accuracy" in line:  # A group done: stop the rest.
      parent.send_signal(signal.SIGTERM)
      break
  seen += parent.stderr.readlines()
  parent.wait(timeout=300)
  text = "".join(seen)
  assert parent.returncode == 75, text[-3000:]
  assert "worker 1/2: process" in text and "CPU cores 0" in text
  assert "[worker 2/2]" in text
  done = run_main("run_lab.py", *[a for a in command if a != "--workers=2"])  # Resumed here.
  assert done.returncode == 0, done.stderr[-3000:]
  assert_trained_once(workdir)
  assert final_metrics(workdir) == reference
  assert "workers_3_shared" in done.stdout
