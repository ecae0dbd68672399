"""Open to research: a model (Linen, and NNX through the bridge), a metric, a data set and an
optimizer of the user's own, each declared in a lab file alone (tests/own_lab.py), with all of
jaxlab's machinery: train, resume, groups, evaluate, summary, capture, profile, TensorBoard, a
lab and its report. (The guide's tutorial, experiments/example_lab.py, runs in test_docs.)"""

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from jaxlab import models
from jaxlab.inspection.compare import capture
from jaxlab.errors import BadValue
from jaxlab.experiment import EXPERIMENTS, build_model, load_lab, resolve_config
from jaxlab.files import read_jsonl
from jaxlab.training.hooks import Hook, OnEpochEnd
from jaxlab.training.state import create_train_state, setup
from jaxlab.inspection.summary import summarize
from jaxlab.training.train import group_configs, train_and_evaluate, train_group
from runstate import Crash, arrays, crash_after, largest_difference
from conftest import ROOT, run_main, script

LAB = str(ROOT / "tests" / "own_lab.py")
SETTINGS = dict(eval_batch_size=48, steps_per_dispatch=2)  # 96 examples: 6 steps an epoch.
SUBMODULES = {"own_linen": ["stem", "conv", "norm", "Dropout_0", "head"],
              "own_nnx": ["bn", "drop", "hidden", "out"]}
OUTPUT = {"own_linen": "head", "own_nnx": "out"}  # The submodule whose output is the logits.


@pytest.fixture(scope="module", autouse=True)
def lab():
  return load_lab(LAB)



def kept_state():
  """A hook that keeps the state of each epoch's end (on the host), and where it keeps it."""
  kept = {}
  return OnEpochEnd(lambda e, r, s: kept.update(state=jax.tree_util.tree_map(np.asarray, s))), kept


RESULTS = ("train_loss", "train_accuracy", "train_top2_accuracy", "val_loss", "val_accuracy",
           "val_top2_accuracy", "learning_rate", "step")


@pytest.mark.parametrize("name", ["own_linen", "own_nnx"])
def test_own_model_resumes_exactly_and_evaluates(tmp_path, name):
  """Killed after its first epoch and resumed, a run ends where the uninterrupted run does, bit
  for bit; evaluate.py reads it back (finding the lab file from config.json)."""
  config = resolve_config(name, **SETTINGS)
  keep, kept = kept_state()
  train_and_evaluate(config, tmp_path / "straight", hooks=[keep])
  straight = arrays(kept.pop("state"))
  with pytest.raises(Crash):
    train_and_evaluate(config, tmp_path / "resumed", hooks=[crash_after(1)])
  summary = train_and_evaluate(config, tmp_path / "resumed", hooks=[keep])
  resumed = arrays(kept.pop("state"))
  assert resumed.keys() == straight.keys()
  for key in straight:
    np.testing.assert_array_equal(resumed[key], straight[key], err_msg=key)
  history, reference = (read_jsonl(tmp_path / d / "metrics.jsonl") for d in ("resumed", "straight"))
  assert [{k: r[k] for k in RESULTS} for r in history] == [{k: r[k] for k in RESULTS}
                                                            for r in reference]
  done = run_main("evaluate.py", f"--workdir={tmp_path / 'resumed'}", "--checkpoint=last",
                  "--json")
  assert done.returncode == 0, done.stderr[-2000:]
  evaluated = json.loads(done.stdout)
  assert evaluated["accuracy"] == summary["evaluation"]["final"]["accuracy"]
  assert evaluated["metrics"]["top2_accuracy"] == pytest.approx(history[-1]["val_top2_accuracy"])
  described = json.loads((tmp_path / "resumed" / "config.json").read_text())
  assert described["experiment"]["declared_in"] == "tests/own_lab.py"  # No machine's path.
  assert described["metrics"]["top2_accuracy"] == {"higher_is_better": True}
  assert described["data"]["class_names"] == ["top", "upper", "lower", "bottom"]


def test_user_metric_is_recorded_for_train_and_validation_and_in_tensorboard(tmp_path):
  train_and_evaluate(resolve_config("own_nnx", **SETTINGS), tmp_path)
  history = read_jsonl(tmp_path / "metrics.jsonl")
  for split in ("train", "val"):
    top2, top1 = ([r[f"{split}_{m}"] for r in history] for m in ("top2_accuracy", "accuracy"))
    assert all(a >= b for a, b in zip(top2, top1)), split
    assert any(a > b for a, b in zip(top2, top1)), split  # Not accuracy under another name.
  summary = json.loads((tmp_path / "metrics.json").read_text())
  assert summary["final_val_top2_accuracy"] == history[-1]["val_top2_accuracy"]
  for split, key in (("train", "train_top2_accuracy"), ("validation", "val_top2_accuracy")):
    events = EventAccumulator(str(tmp_path / "tensorboard" / split))
    events.Reload()
    assert [p.value for p in events.Scalars("epoch_top2_accuracy")] == [
        np.float32(r[key]) for r in history]


def test_a_group_member_equals_its_single_run(tmp_path):
  """Two seeds of the Linen model as one vmapped group (SGD and a schedule): the member of seed
  1 ends where the single run of seed 1 does, up to float rounding."""
  config = resolve_config("own_linen", **SETTINGS)
  configs = group_configs(config, seeds=[0, 1])
  keeps = [kept_state() for _ in configs]
  train_group(configs, [tmp_path / "seed_0", tmp_path / "seed_1"],
              hooks=[[keep] for keep, _ in keeps])
  keep, kept = kept_state()
  train_and_evaluate(configs[1], tmp_path / "single", hooks=[keep])
  assert largest_difference(arrays(keeps[1][1]["state"]), arrays(kept["state"])) < 1e-4
  group, single = (read_jsonl(tmp_path / d / "metrics.jsonl") for d in ("seed_1", "single"))
  for g, s in zip(group, single, strict=True):
    for key in ("train_loss", "val_loss", "val_top2_accuracy", "learning_rate"):
      assert g[key] == pytest.approx(s[key], rel=1e-4, abs=1e-7), key


@pytest.mark.parametrize("name", ["own_linen", "own_nnx"])
def test_summary_counts_every_parameter_and_capture_names_every_submodule(name):
  built = setup(resolve_config(name))
  summary = summarize(built.model, built.example_shape)
  variables = models.abstract_variables(built.model, built.example_shape)
  size = sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(variables))
  assert summary["total_params"] == sum(l["params"] for l in summary["layers"]) == size
  assert summary["trainable_params"] == sum(
      int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(variables["params"]))
  assert sorted(l["name"] for l in summary["layers"]) == sorted(SUBMODULES[name])
  state = create_train_state(built, seed=0, learning_rate=1e-2)
  x = np.random.default_rng(0).random((3, 8, 8, 1), dtype=np.float32)
  layers = capture(built.model, state.variables, x)
  assert sorted(layers) == sorted(SUBMODULES[name])
  assert layers[OUTPUT[name]].shape == (3, 4)  # Fitted to the data set's 4 classes.
  np.testing.assert_allclose(layers[OUTPUT[name]], built.model.apply(state.variables, x),
                             rtol=1e-6, atol=1e-6)  # Compiled whole or op by op: rounding.


def test_bf16_sets_the_models_dtype_and_is_refused_without_one(tmp_path):
  assert build_model("own_linen", precision="bf16").dtype == jnp.bfloat16
  with pytest.raises(BadValue, match="TinyNNX|ToLinen"):
    build_model("own_nnx", precision="bf16")
  done = run_main("train.py", f"--lab={LAB}", "--experiment=own_nnx", "--precision=bf16",
                  f"--workdir={tmp_path}")
  assert done.returncode == 2
  assert re.fullmatch(r"error: --precision=bf16 sets a model's dtype, and \w+ has no dtype field "
                      r".*\n", done.stderr.splitlines(keepends=True)[-1])


NO_TRAIN_LAB = """
import flax.linen as nn
import numpy as np
from flax import nnx
from jaxlab.data import register_dataset
from jaxlab.experiment import Experiment, register

zeros = lambda n: (np.zeros((n, 8, 8), np.uint8), np.zeros((n,), np.uint8))
register_dataset("no_train_blocks", image_shape=(8, 8, 1), class_names=list("abcdefghij"),
                 load=lambda: (*zeros(16), *zeros(16)))

class NoTrain(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(10)(x.reshape((x.shape[0], -1)))

class NoTrainNNX(nnx.Module):
  def __init__(self, *, rngs):
    self.out = nnx.Linear(64, 10, rngs=rngs)

  def __call__(self, x):
    return self.out(x.reshape((x.shape[0], -1)))

register(Experiment(name="no_train", model=NoTrain(), dataset="no_train_blocks", epochs=1))
register(Experiment(name="no_train_nnx", model=nnx.bridge.to_linen(NoTrainNNX),
                    dataset="no_train_blocks", epochs=1))
"""


def test_a_model_without_a_train_argument_is_the_users_error(tmp_path):
  """One `error:` line naming the model and its signature, status 2, from train.py and
  summary.py alike; a Linen module and an NNX one."""
  (tmp_path / "no_train.py").write_text(NO_TRAIN_LAB)
  for experiment, name in (("no_train", "NoTrain"), ("no_train_nnx", "ToLinen")):
    for script_name in ("train.py", "summary.py"):
      done = run_main(script_name, f"--lab={tmp_path / 'no_train.py'}",
                      f"--experiment={experiment}", *(
                          [f"--workdir={tmp_path / experiment}"] if script_name == "train.py"
                          else []))
      assert done.returncode == 2, done.stderr[-2000:]
      assert "Traceback" not in done.stderr
      assert done.stderr.splitlines()[-1] == (
          f"error: the model of {experiment!r} ({name}) has __call__(self, x), without a "
          "`train` argument: jaxlab calls model(x, train=...) (True in its train steps, for "
          "dropout and batch statistics); give it `train: bool = False`")


class CrashInsideEpoch(Hook):
  """Stops the run at the step boundary after global step `step` (its checkpoint saved)."""

  def __init__(self, step):
    self.step = step

  def wants_state(self, step):
    return step == self.step

  def on_step_boundary(self, epoch, state, sums):
    raise Crash


def test_a_checkpoint_written_before_a_metric_existed_resumes_and_evaluates(tmp_path,
                                                                            monkeypatch):
  """The run starts without the metric and stops inside epoch 2 (a checkpoint of its sums so
  far); the lab then declares the metric. evaluate.py reads the old checkpoint with it; the run
  resumes, leaves out only the metric's train mean of the epoch it resumed inside, and records
  it from then on."""
  declared = EXPERIMENTS.get("own_linen")
  config = resolve_config("own_linen", checkpoint_every_steps=2, **SETTINGS)
  monkeypatch.setitem(EXPERIMENTS._items, "own_linen", dataclasses.replace(declared, metrics={}))
  with pytest.raises(Crash):
    train_and_evaluate(config, tmp_path, hooks=[CrashInsideEpoch(8)])  # Epoch 2, step 2 of 6.
  assert "train_top2_accuracy" not in read_jsonl(tmp_path / "metrics.jsonl")[0]
  monkeypatch.setitem(EXPERIMENTS._items, "own_linen", declared)
  done = run_main("evaluate.py", f"--workdir={tmp_path}", "--checkpoint=last", "--json")
  assert done.returncode == 0, done.stderr[-2000:]
  assert json.loads(done.stdout)["epoch"] == 1 and "top2_accuracy" in json.loads(done.stdout)[
      "metrics"]
  summary = train_and_evaluate(config, tmp_path)
  history = read_jsonl(tmp_path / "metrics.jsonl")
  assert [r["epoch"] for r in history] == [1, 2, 3]
  assert history[1]["train_top2_accuracy"] is None  # Its first 2 steps were not summed.
  assert history[1]["val_top2_accuracy"] is not None and history[2]["train_top2_accuracy"]
  assert summary["epochs_completed"] == 3


def test_a_metric_that_is_not_finite_is_written_null(tmp_path, monkeypatch):
  """A metric NaN on some examples: its mean is no number, written `null` (strict JSON) in
  metrics.jsonl and metrics.json, and training goes on (its loss is finite)."""
  declared = EXPERIMENTS.get("own_nnx")
  nan_first = lambda logits, labels: jnp.where(jnp.arange(labels.shape[0]) == 0, jnp.nan, 1.0)
  monkeypatch.setitem(EXPERIMENTS._items, "own_nnx",
                      dataclasses.replace(declared, metrics={"nan_first": nan_first}))
  summary = train_and_evaluate(resolve_config("own_nnx", epochs=1, **SETTINGS), tmp_path)
  strict = lambda text: json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} written"))
  (record,) = [strict(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert record["train_nan_first"] is None and record["val_nan_first"] is None
  assert record["train_loss"] is not None and record["skipped_steps"] == 0
  assert strict((tmp_path / "metrics.json").read_text())["final_val_nan_first"] is None
  assert summary["epochs_completed"] == 1


def test_a_schedules_learning_rate_is_recorded_each_epoch(tmp_path):
  """own_linen's optimizer decays 0.1 by a cosine over 12 steps; an epoch is 6 steps: each
  record holds the rate its last step used."""
  train_and_evaluate(resolve_config("own_linen", **SETTINGS), tmp_path)
  schedule = optax.cosine_decay_schedule(0.1, 12)
  assert [r["learning_rate"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == pytest.approx(
      [float(schedule(6 * epoch - 1)) for epoch in (1, 2, 3)], rel=1e-6)


def test_an_optimizer_that_cannot_be_injected_trains_alone_but_not_in_a_rate_group(tmp_path):
  """It trains a single run, says in a warning that its rate is fixed in the step, and records
  the rate of the schedule it injects itself; a group over learning rates is refused."""
  one = run_main("train.py", f"--lab={LAB}", "--experiment=own_fixed", "--epochs=1",
                 "--steps_per_dispatch=2", f"--workdir={tmp_path / 'one'}")
  assert one.returncode == 0, one.stderr[-2000:]
  assert "optimizer 'sgd_warmup_cosine' cannot take its learning rate as a traced value" in (
      one.stderr)
  schedule = optax.warmup_cosine_decay_schedule(0.0, 0.05, 2, 12)
  [record] = read_jsonl(tmp_path / "one" / "metrics.jsonl")
  assert record["learning_rate"] == pytest.approx(float(schedule(5)), rel=1e-6)  # 6 steps.
  group = run_main("train.py", f"--lab={LAB}", "--experiment=own_fixed", "--epochs=1",
                   "--learning_rates=0.05,0.1", f"--workdir={tmp_path / 'group'}")
  assert group.returncode == 2
  assert group.stderr.splitlines()[-1].startswith(
      "error: optimizer 'sgd_warmup_cosine' cannot take its learning rate as a traced value")


def test_keras_and_the_pytorch_peer_say_they_need_a_plan_family(tmp_path):
  trained = run_main("train.py", f"--lab={LAB}", "--experiment=own_linen", "--epochs=1",
                     "--steps_per_dispatch=2", f"--workdir={tmp_path / 'run'}")
  assert trained.returncode == 0, trained.stderr[-2000:]
  done = run_main("export_keras.py", f"--workdir={tmp_path / 'run'}",
                  f"--output={tmp_path / 'm.keras'}")
  assert done.returncode == 2 and "Traceback" not in done.stderr
  assert done.stderr.splitlines()[-1] == ("error: Keras export and parity is for the plan "
                                          "families (jaxlab.models.MLP, ConvNet); this model is "
                                          "a TinyRes")
  from jaxlab.perf.benchmark import to_torch
  with pytest.raises(BadValue, match="the PyTorch peer is for the plan families"):
    to_torch(setup(resolve_config("own_linen")))


def test_profile_step_times_the_users_model():
  done = run_main("profile_step.py", f"--lab={LAB}", "--experiment=own_linen", "--steps=2",
                  "--json")
  assert done.returncode == 0, done.stderr[-2000:]
  found = json.loads(done.stdout)
  # The model's FLOPs, read from its jaxpr: the two 3x3 convs (4 filters; 1 and 4 channels in,
  # 'SAME' padding: 8 x 8 outputs) and the head (4 features to 4 classes), for a batch of 16.
  forward = 2 * (8 * 8 * 4 * 9 * 1 + 8 * 8 * 4 * 9 * 4 + 4 * 4) * 16
  assert found["eval_step"]["model_flops"] == forward
  assert found["train_step"]["median_step_seconds"] > 0


@pytest.mark.slow
def test_a_lab_of_ones_own_runs_and_reports(tmp_path):
  """run_lab.py on the lab file: its data set, both models, two seeds; report.py in a process
  of its own (loading the lab file only to draw the data set's samples) answers the question
  on the user's metric, and labels the confusion matrices with the data set's classes."""
  done = run_main("run_lab.py", f"--lab={LAB}", f"--workdir={tmp_path / 'lab'}",
                  "--experiments=own_linen,own_nnx", "--seeds=0,1", "--epochs=2",
                  "--steps_per_dispatch=2", "--eval_batch_size=48")
  assert done.returncode == 0, done.stderr[-3000:]
  script("report.py", f"--runs={tmp_path / 'lab'}", f"--out={tmp_path / 'report'}")
  report = json.loads((tmp_path / "report" / "report.json").read_text())
  (question,) = report["findings"]["questions"]
  (comparison,) = question["comparisons"]
  assert comparison["on"] == "top2_accuracy" and comparison["n"] == [2, 2]
  assert question["answer"][0].startswith("On validation top2_accuracy: `own_linen`")
  header, cells = report["other_metrics"]
  assert header == ["experiment", "final val top2_accuracy"] and len(cells) == 2
  (samples,) = report["samples"]
  assert samples["dataset"] == "tiny_blocks" and samples["file"]
  assert (tmp_path / "report" / samples["file"]).is_file()
  confusion = report["experiments"][0]["confusion"]
  assert confusion["class_names"] == ["top", "upper", "lower", "bottom"]
