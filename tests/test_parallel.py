"""Data parallelism on simulated CPU devices, and a run of two processes with jax.distributed.

The device count (XLA_FLAGS) is fixed when JAX starts: every check on 8 devices runs in one
process of 8 simulated CPU devices (the `eight_devices` fixture), the two-process run in two.
"""

import json
import re
import socket
import subprocess
import sys

import pytest

from datafiles import synthetic_dataset, write_idx_arrays
from runstate import assert_rounding_only, biases_before_batch_norm, final_state, largest_difference
from conftest import ROOT, SCRIPT_XLA_FLAGS, run_main, script_environment

TESTS = ROOT / "tests"

SNIPPET = """
import json, os, pathlib, re, shutil, sys
sys.path.insert(0, {tests!r})
import jax
import numpy as np
from datafiles import random_dataset, synthetic_dataset
from runstate import arrays, biases_before_batch_norm, final_state, largest_difference
from jaxlab.training import parallel
from jaxlab.experiment import build_model, resolve_config
from jaxlab.experiment import EXPERIMENTS, Experiment, register
from jaxlab.models import Conv, ConvBlock, ConvNet, Dense, MaxPool
from jaxlab.training.state import create_group_state, make_setup, seed_keys
from jaxlab.training.steps import make_steps
from jaxlab.training.train import train_and_evaluate
from jaxlab import caches

caches.enable_compilation_cache()  # The suite's (JAXLAB_XLA_CACHE_DIR), as the scripts'.
register(Experiment(
    name="parallel_small_cnn", dataset="mnist", epochs=1, batch_size=32,
    model=ConvNet(blocks=(ConvBlock((Conv(8, 3, padding="same"),), MaxPool(2), True, 0.25),
                          ConvBlock((Conv(16, 3),), MaxPool(2, 1), True)),
                  head=(Dense(32, "relu", batch_norm=True, dropout=0.5),))))


def check(experiment, lr, resumes, out):
  ds = synthetic_dataset(n_train=640, n_test=64)
  settings = dict(dataset="mnist", batch_size=32, steps_per_dispatch=5, eval_batch_size=32,
                  optimizer="sgd", learning_rate=lr)
  # 20 steps on 1, 4 and 8 devices, then runs resumed on another number of devices.
  for n in (1, 4, 8):
    train_and_evaluate(resolve_config(experiment, epochs=1, num_devices=n, **settings),
                       out / f"devices_{{n}}", dataset=ds)
  resumed = {{}}
  for first, then in resumes:
    # The run of `first` devices, its second epoch on `then` devices; against its second epoch
    # on `first` devices (as 2 epochs straight: a resume on as many devices is bit for bit): a
    # state restored wrong (or not at all) would end far from it.
    run, straight = out / f"from_{{first}}_to_{{then}}", out / f"straight_{{first}}"
    for copy, n in ((run, then), (straight, first)):
      shutil.copytree(out / f"devices_{{first}}", copy, ignore=shutil.ignore_patterns(".lock"))
      train_and_evaluate(resolve_config(experiment, epochs=2, num_devices=n, **settings),
                         copy, dataset=ds)
    resumed[f"{{first}}_{{then}}"] = float(largest_difference(
        final_state(run), final_state(straight), biases_before_batch_norm(straight)))
  # What the step of 8 devices is: its compiled program, as XLA partitioned it (a chunk as one
  # program: the scan loop, whatever loop the CPU trains CNNs with).
  mesh = parallel.data_mesh(8)
  model = make_setup(build_model(experiment, "mnist"), (28, 28, 1), "sgd")
  state = create_group_state(model, [0], [0.01], parallel.replicated(mesh))
  images, labels = parallel.put_replicated((ds.train_images, ds.train_labels), mesh)
  batches = jax.numpy.arange(640).reshape(1, 20, 32)
  compiled = make_steps(model, "stop", mesh, "scan").train_chunk.lower(
      state, images, labels, batches, 0, length=5).compile()
  out_state, _ = compiled.output_shardings
  # One step on 4 and on 8 devices against one step on one device from the same state, at
  # each of the one-device trajectory's 20 states: every array against its scale (but the
  # biases before BatchNormalization, whose true gradient is 0: rounding noise). On random
  # pixels: the synthetic images' lit blocks hold near-ties that rounding breaks either way in
  # max pooling.
  skip = biases_before_batch_norm(out / "devices_1")
  order = jax.random.permutation(jax.random.fold_in(seed_keys(0)[2], 1), 640).reshape(1, 20, 32)
  noise = random_dataset(n_train=640)
  meshes = {{n: parallel.data_mesh(n) for n in (1, 4, 8)}}
  on_mesh = {{n: (make_steps(model, "stop", m),
                 parallel.put_replicated((noise.train_images, noise.train_labels), m))
             for n, m in meshes.items()}}
  state = create_group_state(model, [0], [lr], parallel.replicated(meshes[1]))
  differences = {{4: [], 8: []}}
  for i in range(20):
    host = jax.tree_util.tree_map(np.asarray, state)
    after = {{}}
    for n, (steps_n, (x, y)) in on_mesh.items():
      after[n], _ = steps_n.train_chunk(jax.device_put(host, parallel.replicated(meshes[n])), x,
                                        y, order, i, length=1)
    state = after[1]
    for n in (4, 8):
      differences[n].append(float(largest_difference(arrays(after[n]), arrays(state), skip)))
  return {{
      "resume_differences": resumed,
      "step_differences": differences,
      "devices": jax.device_count(),
      "all_reduces": len(re.findall(r"all-reduce", compiled.as_text())),
      "gathered_shapes": sorted(set(re.findall(r"u8\\[([0-9,]+)\\]", compiled.as_text()))),
      "state_replicated": all(s.is_fully_replicated
                              for s in jax.tree_util.tree_leaves(out_state)),
  }}


facts = {{}}
try:  # A global batch that the 8 devices do not divide.
  train_and_evaluate(resolve_config("mlp_halving", dataset="mnist", epochs=1, batch_size=30),
                     {refused!r}, dataset=synthetic_dataset())
except ValueError as e:
  facts["refused"] = str(e)
for experiment, lr, resumes in {cases!r}:
  facts[experiment] = check(experiment, lr, resumes, pathlib.Path({out!r}) / experiment)
# A last batch the 8 devices do not divide (644 examples at batch 32: 4 left), on 8 and on 1.
ragged = synthetic_dataset(n_train=644, n_test=64)
for n in (1, 8):
  train_and_evaluate(resolve_config("mlp_halving", dataset="mnist", epochs=1, batch_size=32,
                                    steps_per_dispatch=5, eval_batch_size=32, optimizer="sgd",
                                    learning_rate=0.05, num_devices=n),
                     pathlib.Path({out!r}) / "ragged" / f"devices_{{n}}", dataset=ragged)
# A model, data set, metric and optimizer of a user's lab file, on 1 and 8 devices.
from jaxlab.experiment import load_lab
load_lab({own_lab!r})
for n in (1, 8):
  train_and_evaluate(resolve_config("own_linen", epochs=2, num_devices=n, steps_per_dispatch=2,
                                    eval_batch_size=48), pathlib.Path({out!r}) / "own" / f"devices_{{n}}")
print(json.dumps(facts))
"""

# An MLP with BatchNorm and Dropout, and a small CNN with both, each at its SGD rate, and the
# resumes on another number of devices each is checked with.
CASES = [("mlp_halving", 0.05, ((8, 1),)), ("parallel_small_cnn", 0.01, ((1, 8),))]


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
  """Every check on 8 simulated CPU devices, in one process: (its facts, its folder)."""
  out = tmp_path_factory.mktemp("eight_devices")
  code = SNIPPET.format(tests=str(TESTS), out=str(out), refused=str(out / "refused"),
                        cases=CASES, own_lab=str(TESTS / "own_lab.py"))
  env = script_environment(
      XLA_FLAGS=f"{SCRIPT_XLA_FLAGS} --xla_force_host_platform_device_count=8")
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1]), out


def assert_same_metrics(run, reference, rtol=1e-2):
  """A whole run's losses: close, not equal (rounding differences add up over a run; the
  accuracies, on 64 examples, move in steps of 1.6%)."""
  read = lambda r: [json.loads(l) for l in (r / "metrics.jsonl").read_text().splitlines()]
  for got, want in zip(read(run), read(reference), strict=True):
    for key in ("train_loss", "val_loss"):
      assert got[key] == pytest.approx(want[key], rel=rtol), (run.name, key)


def difference_of_runs(run, reference):
  """The largest difference of the runs' newest states, each array against its scale, but the
  biases before BatchNormalization (rounding noise)."""
  return largest_difference(final_state(run), final_state(reference),
                            biases_before_batch_norm(reference))


# An MLP with BatchNorm and Dropout, and a small CNN with both; SGD (Adam would turn rounding
# differences in gradients near zero into full steps). From the same state, one step on 4 or 8
# devices leaves every array within 1e-5 of its scale of the one-device step
# (`assert_rounding_only`): the devices' partial sums and the all-reduce add in another order
# than one device does (about 1e-6 apart). Whole runs are compared by their losses: over 20
# steps the rounding differences add up, and one that moves a pre-activation across zero
# changes a ReLU's gradient by a finite amount (seen here in the MLP's first kernel at step 19,
# 8e-4 of its scale; the 8-device run's mean train loss then 0.2% off), as between two
# machines.
# A checkpoint of 8 devices resumed on 1 (the MLP), one of 1 on 8 (the CNN).
@pytest.mark.slow
@pytest.mark.parametrize("experiment,lr,resumes", CASES)
def test_data_parallel_steps_compute_what_one_device_does(eight_devices, experiment, lr,
                                                          resumes):
  found, out = eight_devices
  facts, runs = found[experiment], out / experiment
  one = runs / "devices_1"
  for n in (4, 8):
    assert_rounding_only(facts["step_differences"][str(n)])
    assert_same_metrics(runs / f"devices_{n}", one)
    config = json.loads((runs / f"devices_{n}" / "config.json").read_text())
    assert config["environment"]["mesh"]["devices"] == n
    assert config["environment"]["mesh"]["processes"] == 1
  # The step of 8 devices: each device gathers 4 of the batch's 32 images, the gradients and
  # BatchNorm statistics are all-reduced, and the state stays replicated.
  assert facts["devices"] == 8 and facts["all_reduces"] > 0 and facts["state_replicated"]
  assert any(re.fullmatch(r"(1,)?4,(1,)?28,28,1", s) for s in facts["gathered_shapes"])
  assert not any(re.fullmatch(r"(1,)?32,(1,)?28,28,1", s) for s in facts["gathered_shapes"])
  # A checkpoint of 8 devices restores on 1, and one of 1 on 8: its state, not only its step
  # (the run ends where 2 epochs straight on the first count end, up to rounding).
  for first, then in resumes:
    run = runs / f"from_{first}_to_{then}"
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and records[-1]["step"] == 40
    config = json.loads((run / "config.json").read_text())
    assert config["environment"]["mesh"]["devices"] == then
    assert facts["resume_differences"][f"{first}_{then}"] < 1e-3


@pytest.mark.slow
def test_a_last_batch_the_mesh_does_not_divide_is_computed_whole(eight_devices):
  """644 examples at batch 32 on 8 devices: 20 batches split across them, and the last 4
  examples computed whole on every device; the run is the one-device run's, up to rounding."""
  runs = eight_devices[1] / "ragged"
  one, eight = runs / "devices_1", runs / "devices_8"
  for run in (one, eight):
    (record,) = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert record["step"] == 21
  assert_same_metrics(eight, one)
  assert difference_of_runs(eight, one) < 1e-4


@pytest.mark.slow
def test_own_model_on_eight_devices(eight_devices):
  """The residual CNN of tests/own_lab.py (its data set, metric and scheduled optimizer) trained
  data parallel on 8 devices computes what it does on one, up to float rounding."""
  runs = eight_devices[1] / "own"
  one, eight = runs / "devices_1", runs / "devices_8"
  assert json.loads((eight / "config.json").read_text())["environment"]["mesh"]["devices"] == 8
  assert_same_metrics(eight, one)
  read = lambda r: [json.loads(l) for l in (r / "metrics.jsonl").read_text().splitlines()]
  assert [r["val_top2_accuracy"] for r in read(eight)] == pytest.approx(
      [r["val_top2_accuracy"] for r in read(one)])
  assert largest_difference(final_state(eight), final_state(one)) < 1e-4


@pytest.mark.slow
def test_a_batch_the_mesh_does_not_divide_is_refused(eight_devices):
  assert eight_devices[0]["refused"] == (
      "batch_size 30 is not divisible by the 8 devices of the mesh: use a multiple of 8, or "
      "--num_devices")


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_one_run(tmp_path):
  """train.py as two processes (jax.distributed on a loopback coordinator), two simulated CPU
  devices each: both end with the same state, that of a one-process run up to float rounding,
  and only process 0 writes (process 1 is given its own --workdir, so anything it wrote would
  show there)."""
  # The learnable synthetic data: on random noise, SGD at this rate is chaotic, and rounding
  # differences grow into different runs within 20 steps.
  data = write_idx_arrays(tmp_path / "data", synthetic_dataset(n_train=640, n_test=64))
  args = ["--experiment=mlp_halving", "--dataset=mnist", f"--data_dir={data}", "--epochs=1",
          "--batch_size=32", "--steps_per_dispatch=5", "--optimizer=sgd",
          "--learning_rate=0.05", "--eval_batch_size=32", "--noprogress"]
  script = str(ROOT / "scripts" / "train.py")
  port = free_port()
  env = script_environment(
      XLA_FLAGS=f"{SCRIPT_XLA_FLAGS} --xla_force_host_platform_device_count=2")
  processes = [subprocess.Popen(
      [sys.executable, script, *args, f"--workdir={tmp_path / f'process_{i}'}",
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outputs = [p.communicate(timeout=600) for p in processes]
  for p, (_, stderr) in zip(processes, outputs):
    assert p.returncode == 0, stderr[-3000:]
  fingerprints = [re.search(rf"process {i} of 2: final state fingerprint (\w+)", err).group(1)
                  for i, (_, err) in enumerate(outputs)]
  assert fingerprints[0] == fingerprints[1]
  assert not (tmp_path / "process_1").exists() or not any((tmp_path / "process_1").rglob("*"))
  written = tmp_path / "process_0"
  config = json.loads((written / "config.json").read_text())
  assert config["environment"]["mesh"] == {"axis": "data", "devices": 4, "processes": 2,
                                           "process_index": 0, "device_kinds": ["cpu"]}
  single = run_main("train.py", *args, f"--workdir={tmp_path / 'single'}")  # One device.
  assert single.returncode == 0, single.stderr[-3000:]
  assert difference_of_runs(written, tmp_path / "single") < 1e-5
