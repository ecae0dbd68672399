"""XLA:CPU's kernels: chosen by measuring once, cached per machine and jaxlib, only within float
rounding of the exact gradients, applied before JAX starts, kept by a resumed run."""

import json
import os

import numpy as np
import pytest

from jaxlab import kernels
from conftest import script

EXACT = {"conv": np.full((3, 3), 0.5), "dense": np.full((4,), -2.0)}


def fake_measure(seconds, errors, calls):
  """`kernels.measure` without processes: candidate NAME takes seconds[NAME] and its gradients
  are off the exact ones by errors[NAME] (relative)."""
  def measure(name, out, repeats=5):
    calls.append(name)
    np.savez(out, **{k: v * (1 + errors[name]) for k, v in EXACT.items()})
    if name == "xla":
      np.savez(out.with_suffix(".exact.npz"), **EXACT)
    return {"seconds": seconds[name]}
  return measure


def test_choose_measures_once_per_machine_and_keeps_only_exact_enough_kernels(
    tmp_path, monkeypatch):
  monkeypatch.setenv("JAXLAB_CACHE_DIR", str(tmp_path))
  calls = []
  # ynn_dot is fastest but its gradients are off by 1e-2: not float rounding.
  monkeypatch.setattr(kernels, "measure", fake_measure(
      {"xla": 1.0, "ynn_dot": 0.3, "ynn_dot_eltwise": 0.5},
      {"xla": 1e-6, "ynn_dot": 1e-2, "ynn_dot_eltwise": 1e-6}, calls))
  record = kernels.choose(log=lambda s: None)
  assert record["name"] == "ynn_dot_eltwise"
  assert record["xla_flags"] == kernels.KERNELS["ynn_dot_eltwise"]
  assert record["candidates"]["ynn_dot"]["same_results"] is False
  assert record["candidates"]["ynn_dot"]["relative_error"] == pytest.approx(1e-2)
  assert calls == list(kernels.KERNELS)
  assert kernels.choose(log=lambda s: None) == record and calls == list(kernels.KERNELS)
  cached = json.loads((tmp_path / "kernels.json").read_text())
  assert list(cached) == [kernels.machine_key()]
  # Another jaxlib (or CPU) is another key: measured again, the first record kept.
  monkeypatch.setattr(kernels, "machine_key", lambda: "another machine")
  monkeypatch.setattr(kernels, "measure", fake_measure(
      {"xla": 1.0, "ynn_dot": 0.98, "ynn_dot_eltwise": 0.97},
      {"xla": 1e-6, "ynn_dot": 1e-6, "ynn_dot_eltwise": 1e-6}, calls))
  assert kernels.choose(log=lambda s: None)["name"] == "xla"  # Within the timing noise.
  assert len(json.loads((tmp_path / "kernels.json").read_text())) == 2


def test_of_kernels_within_the_margin_the_simplest_is_chosen(tmp_path, monkeypatch):
  monkeypatch.setenv("JAXLAB_CACHE_DIR", str(tmp_path))
  monkeypatch.setattr(kernels, "measure", fake_measure(
      {"xla": 1.0, "ynn_dot": 0.51, "ynn_dot_eltwise": 0.5},
      {"xla": 1e-6, "ynn_dot": 1e-6, "ynn_dot_eltwise": 1e-6}, []))
  assert kernels.choose(log=lambda s: None)["name"] == "ynn_dot"


@pytest.mark.slow
def test_the_measured_step_runs_and_is_exact_to_float_rounding(tmp_path):
  """The real measurement of XLA as it comes, in its own process."""
  found = kernels.measure("xla", tmp_path / "xla.npz", repeats=1)
  assert found["seconds"] > 0
  assert kernels._error(tmp_path / "xla.npz", tmp_path / "xla.exact.npz") < 1e-4


def test_unknown_kernels_are_named(monkeypatch):
  monkeypatch.setattr(kernels, "_backend_started", lambda: False)
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
  monkeypatch.setenv(kernels.APPLIED_ENV, "xla")  # Restored after, with XLA_FLAGS.
  with pytest.raises(ValueError, match="unknown kernels 'mkl'; known: auto, xla, ynn_dot"):
    kernels.apply("mkl")
  assert kernels.apply("ynn_dot") == "ynn_dot"
  assert os.environ["XLA_FLAGS"] == ("--xla_cpu_enable_fast_math=false "
                                     "--xla_cpu_experimental_ynn_fusion_type=dot")
  assert kernels.apply("auto", started_with="xla") == "xla"  # A resumed run's, not measured.
  assert os.environ["XLA_FLAGS"] == "--xla_cpu_enable_fast_math=false"
  assert kernels.applied() == "xla"


@pytest.mark.slow
def test_scripts_apply_the_kernels_before_jax_starts_and_a_resumed_run_keeps_them(tmp_path):
  from datafiles import write_idx_dataset

  profile = script("profile_step.py", "--experiment=mlp_halving", "--steps=1", "--batch_size=8",
                   "--kernels=ynn_dot", f"--hlo_dir={tmp_path / 'hlo'}")
  assert "kernels ynn_dot" in profile.stdout
  assert "__ynn_fusion" in "".join(p.read_text() for p in (tmp_path / "hlo").iterdir())
  write_idx_dataset(tmp_path / "data", n_train=64, n_test=32)
  args = ["train.py", "--experiment=mlp_halving", "--dataset=mnist", "--batch_size=32",
          f"--data_dir={tmp_path / 'data'}", f"--workdir={tmp_path / 'run'}"]
  script(*args, "--epochs=1", "--kernels=ynn_dot")
  environment = lambda: json.loads((tmp_path / "run" / "config.json").read_text())["environment"]
  assert environment()["kernels"] == "ynn_dot"
  assert kernels.KERNELS["ynn_dot"] in environment()["xla_flags"]
  script(*args, "--epochs=2", "--kernels=auto")  # auto: the kernels the run started with.
  assert environment()["kernels"] == "ynn_dot"
  script(*args, "--epochs=3", "--kernels=xla")  # Named: as told.
  assert environment()["kernels"] == "xla"
