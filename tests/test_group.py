"""Groups: K seeds or learning rates of one architecture as one vmapped state and program."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.rundir import checkpoint
from jaxlab.experiment import EXPERIMENTS, Experiment, build_model, register, resolve_config
from jaxlab.files import read_jsonl
from jaxlab.models import Conv, ConvBlock, ConvNet, Dense, MaxPool
from jaxlab.training.state import create_group_state, make_setup, member, seed_keys, stack
from jaxlab.training.steps import make_steps
from jaxlab.rundir.run import member_dir
from jaxlab.training.train import _out_of_memory, group_configs, train_and_evaluate, train_group
from datafiles import random_dataset, synthetic_dataset
from runstate import (Crash, arrays, assert_rounding_only, biases_before_batch_norm, crash_after,
                      final_state, largest_difference)
from conftest import run_main, script
import conftest

if "group_small_cnn" not in EXPERIMENTS:
  register(Experiment(
      name="group_small_cnn", dataset="fashion_mnist", epochs=2, batch_size=32,
      model=ConvNet(blocks=(ConvBlock((Conv(8, 3, padding="same"),), MaxPool(2), True, 0.25),
                            ConvBlock((Conv(16, 3),), MaxPool(2, 1), True)),
                    head=(Dense(32, "relu", batch_norm=True, dropout=0.5),))))

# 256 examples at batch 32: 8 steps an epoch; two epochs.
SMALL = {**conftest.SMALL, "epochs": 2}
METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")


def assert_states_close(run, reference, rtol=1e-5, atol=1e-6):
  """Every array within rtol of its scale plus atol, but the biases before BatchNormalization."""
  a, b = final_state(run), final_state(reference)
  assert a.keys() == b.keys()
  skip = biases_before_batch_norm(reference)
  for key in sorted(set(a) - skip):
    bound = rtol * np.abs(b[key]).max() + atol
    assert np.abs(a[key] - b[key]).max() <= bound, (key, np.abs(a[key] - b[key]).max(), bound)


def assert_same_metrics(group_run, single_run, rtol, keys=METRICS):
  got, want = read_jsonl(group_run / "metrics.jsonl"), read_jsonl(single_run / "metrics.jsonl")
  assert [r["epoch"] for r in got] == [r["epoch"] for r in want]
  for g, w in zip(got, want):
    for key in keys:
      assert g[key] == pytest.approx(w[key], rel=rtol, abs=1e-7), key


@pytest.mark.slow
@pytest.mark.parametrize("experiment,dataset", [("mlp_dropout", "mnist"),
                                                ("group_small_cnn", "fashion_mnist")])
def test_members_equal_single_runs(tmp_path, experiment, dataset):
  """Three seeds as one vmapped group against three single runs (SGD; with Adam, rounding
  differences in gradients near zero become lr-sized steps: see the next test).

  Step by step, from the same states: every array of a member after one step within 1e-5 of
  its scale of the single run's (but the biases before BatchNormalization, rounding noise
  themselves; see `assert_rounding_only`). Vmapped Dense layers are batched matmuls that sum in
  another order than single ones; vmapped convolutions become one grouped convolution, another
  algorithm on the CPU.
  Whole runs (4 steps) are compared by their losses, within 1%: over a run the rounding
  differences add up, and one that moves a pre-activation across zero changes a ReLU's
  gradient by a finite amount (the MLP's mean train loss 7e-5 apart here)."""
  ds = random_dataset(dataset, n_train=128, n_test=64)
  base = resolve_config(experiment, **{**SMALL, "dataset": dataset, "optimizer": "sgd",
                                       "learning_rate": 0.05, "epochs": 1})
  configs = group_configs(base, seeds=[0, 1, 2])
  dirs = [member_dir(tmp_path / "group", c, by_seed=True, by_rate=False) for c in configs]
  assert [d.name for d in dirs] == ["seed_0", "seed_1", "seed_2"]
  summaries = train_group(configs, dirs, dataset=ds)
  assert [json.loads((d / "config.json").read_text())["config"]["seed"] for d in dirs] == [0, 1,
                                                                                            2]
  for config, directory, summary in zip(configs, dirs, summaries):
    single = tmp_path / f"single_{config.seed}"
    train_and_evaluate(config, single, dataset=ds)
    assert_same_metrics(directory, single, rtol=1e-2, keys=("train_loss", "val_loss"))
    assert summary["group"] == [str(d) for d in dirs]
  # Step by step: the group's step against each single run's, from the single runs' states.
  built = make_setup(build_model(experiment, dataset), ds.info.image_shape, "sgd")
  steps = make_steps(built)
  images, labels = jax.device_put(ds.train_images), jax.device_put(ds.train_labels)
  orders = jnp.stack([jax.random.permutation(jax.random.fold_in(seed_keys(c.seed)[2], 1), 128)
                      .reshape(4, 32) for c in configs])
  singles = [create_group_state(built, [c.seed], [0.05]) for c in configs]
  skip, differences = biases_before_batch_norm(dirs[0]), []
  for i in range(4):
    stacked = stack([member(checkpoint.to_host(s), 0) for s in singles])
    group, _ = steps.train_chunk(stacked, images, labels, orders, i, length=1)
    singles = [steps.train_chunk(s, images, labels, orders[k:k + 1], i, length=1)[0]
               for k, s in enumerate(singles)]
    differences += [largest_difference(arrays(member(group, k)), arrays(member(single, 0)),
                                       skip) for k, single in enumerate(singles)]
  assert_rounding_only(differences)
  # Different seeds really are different runs.
  assert largest_difference(final_state(dirs[0]), final_state(dirs[1])) > 0.1


@pytest.mark.slow
def test_a_member_does_not_depend_on_its_group(tmp_path):
  """Seed 4 first beside seed 5 and second beside seed 7: bit-identical, with Adam, BatchNorm
  and Dropout. Nothing leaks between members (statistics, keys, orders) and a member's position
  does not matter. A group of another size is another compiled program, whose sums may run in
  another order: seed 4 of a group of 3 agrees up to float rounding."""
  ds = synthetic_dataset(n_train=256, n_test=64)
  base = resolve_config("mlp_big_small_big", **SMALL)
  for name, seeds in (("a", [4, 5]), ("b", [7, 4]), ("c", [7, 5, 4])):
    train_group(group_configs(base, seeds=seeds), [tmp_path / name / f"seed_{s}" for s in seeds],
                dataset=ds)
  reference = final_state(tmp_path / "a" / "seed_4")
  other = final_state(tmp_path / "b" / "seed_4")
  assert other.keys() == reference.keys()
  for key in reference:
    np.testing.assert_array_equal(other[key], reference[key], err_msg=key)
  got, want = (read_jsonl(tmp_path / name / "seed_4" / "metrics.jsonl") for name in "ba")
  assert [[r[k] for k in METRICS] for r in got] == [[r[k] for k in METRICS] for r in want]
  assert_states_close(tmp_path / "c" / "seed_4", tmp_path / "a" / "seed_4")
  assert_same_metrics(tmp_path / "c" / "seed_4", tmp_path / "a" / "seed_4", rtol=1e-5,
                      keys=("train_loss", "val_loss"))


@pytest.mark.slow
def test_learning_rate_grid(tmp_path):
  ds = synthetic_dataset(n_train=128, n_test=64)
  base = resolve_config("mlp_halving", **{**SMALL, "optimizer": "sgd", "epochs": 1})
  configs = group_configs(base, seeds=[0, 1], learning_rates=[0.01, 0.1])
  assert [(c.learning_rate, c.seed) for c in configs] == [(0.01, 0), (0.01, 1), (0.1, 0),
                                                          (0.1, 1)]
  dirs = [member_dir(tmp_path / "grid", c, by_seed=True, by_rate=True) for c in configs]
  assert dirs[2] == tmp_path / "grid" / "lr_0.1" / "seed_0"
  train_group(configs, dirs, dataset=ds)
  for config, directory in zip(configs, dirs):
    single = tmp_path / f"single_{config.learning_rate}_{config.seed}"
    train_and_evaluate(config, single, dataset=ds)
    assert_states_close(directory, single)
    assert_same_metrics(directory, single, rtol=1e-5)
    records = read_jsonl(directory / "metrics.jsonl")
    assert {r["learning_rate"] for r in records} == {config.learning_rate}
    saved_rate = checkpoint.read(sorted((directory / "checkpoints").glob("step_*"))[-1])[1][
        "state"]["opt_state"]["hyperparams"]["learning_rate"]
    assert float(saved_rate) == pytest.approx(config.learning_rate)


@pytest.mark.slow
def test_a_killed_group_resumes_to_the_same_end(tmp_path):
  ds = synthetic_dataset(n_train=256, n_test=64)
  base = resolve_config("mlp_dropout", **{**SMALL, "epochs": 3})
  configs = group_configs(base, seeds=[0, 1])
  straight = [tmp_path / "straight" / f"seed_{c.seed}" for c in configs]
  train_group(configs, straight, dataset=ds)

  resumed = [tmp_path / "resumed" / f"seed_{c.seed}" for c in configs]
  with pytest.raises(Crash):
    train_group(configs, resumed, dataset=ds, hooks=[[], [crash_after(2)]])
  assert [len(read_jsonl(d / "metrics.jsonl")) for d in resumed] == [2, 2]
  # Member 1 lost its newest checkpoint: the group resumes from the step both members have.
  (resumed[1] / "checkpoints" / "step_000000016.msgpack").unlink()
  train_group(configs, resumed, dataset=ds)
  for a, b in zip(resumed, straight):
    state_a, state_b = final_state(a), final_state(b)
    for key in state_b:
      np.testing.assert_array_equal(state_a[key], state_b[key], err_msg=key)
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("epoch_seconds",
                                                                 "eval_seconds", "time")}
                        for r in rs]
    assert strip(read_jsonl(a / "metrics.jsonl")) == strip(read_jsonl(b / "metrics.jsonl"))


def test_members_may_differ_only_in_seed_and_learning_rate(tmp_path):
  a = resolve_config("mlp_halving", **SMALL)
  b = resolve_config("mlp_halving", **{**SMALL, "batch_size": 16, "seed": 1})
  with pytest.raises(ValueError, match="may differ only in seed and learning rate, not in "
                                       "batch_size: 32 -> 16"):
    train_group([a, b], [tmp_path / "a", tmp_path / "b"], dataset=synthetic_dataset())
  with pytest.raises(ValueError, match="--seeds lists a value twice"):
    group_configs(a, seeds=[1, 1])


def test_members_that_do_not_fit_are_named():
  from jaxlab.training.state import setup
  config = resolve_config("vgg_cifar10")
  built = setup(config)
  full = jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 9 GiB")
  error = _out_of_memory(full, config, 32, built)
  assert isinstance(error, MemoryError)
  assert str(error).startswith("32 members of 39,935,562 parameters each do not fit")
  assert "train fewer seeds" in str(error)
  single = _out_of_memory(full, config, 1, built)  # One run: what to lower is its batch.
  assert str(single).startswith("a run of 39,935,562 parameters at batch size 128 does not fit")
  assert "--batch_size" in str(single) and "seeds" not in str(single)
  for other in (ValueError("something else"), RuntimeError("RESOURCE_EXHAUSTED: not XLA's")):
    assert _out_of_memory(other, config, 32, built) is other


@pytest.mark.slow
def test_group_through_the_scripts(tmp_path):
  """train.py --seeds: each member a run directory that evaluate.py reads; a second process
  running the same architecture (other seeds) compiles no XLA program."""
  from datafiles import write_idx_dataset
  write_idx_dataset(tmp_path / "data", n_train=96, n_test=40)
  args = ["--experiment=mlp_halving", "--dataset=mnist", f"--data_dir={tmp_path / 'data'}",
          "--epochs=2", "--batch_size=32", "--steps_per_dispatch=3"]
  cache = {"JAXLAB_XLA_CACHE_DIR": str(tmp_path / "xla")}  # Empty: the first run compiles.
  first = script("train.py", *args, f"--workdir={tmp_path / 'a'}", "--seeds=0,1,2", env=cache)
  assert "seed 2: final validation accuracy" in first.stdout
  evaluated = json.loads(run_main("evaluate.py", f"--workdir={tmp_path / 'a' / 'seed_1'}",
                                  "--json").stdout)
  summary = json.loads((tmp_path / "a" / "seed_1" / "metrics.json").read_text())
  assert evaluated["accuracy"] == summary["evaluation"]["best"]["accuracy"]
  assert summary["startup"]["compilations"] > 0
  script("train.py", *args, f"--workdir={tmp_path / 'b'}", "--seeds=5,6,7", env=cache)
  again = json.loads((tmp_path / "b" / "seed_6" / "metrics.json").read_text())["startup"]
  assert again["compilations"] == 0 and again["programs_from_cache"] > 0
  assert again["seconds_to_first_step"] is not None
