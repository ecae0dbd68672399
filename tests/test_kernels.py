"""XLA:CPU's kernels: chosen per kind of model by measuring once, cached per machine and jaxlib,
only within float rounding of the exact gradients, applied before JAX starts, kept by a resumed
run."""

import json
import os
import pathlib
import sys

import numpy as np
import pytest

from jaxlab.training import kernels
from conftest import SCRIPT_XLA_FLAGS, run_main, script

EXACT = {"w": np.full((3, 3), 0.5), "b": np.full((4,), -2.0)}


def fake_measure(seconds, errors, calls):
  """`kernels.measure` without a process: on KIND's step candidate NAME takes
  seconds[KIND][NAME] (XLA's time in every round, so `vs_xla` is the ratio) and its gradients
  are off the exact ones by errors[KIND][NAME] (relative)."""
  def measure(out, repeats=9):
    calls.append(repeats)
    found = {}
    for kind in kernels.KINDS:
      np.savez(out / f"{kind}.exact.npz", **EXACT)
      found[kind] = {}
      for name in seconds[kind]:
        off = 1 + errors[kind][name]
        np.savez(out / f"{kind}.{name}.npz", **{k: v * off for k, v in EXACT.items()})
        t = seconds[kind][name]
        found[kind][name] = {"seconds": t, "vs_xla": t / seconds[kind]["xla"]}
    return found
  return measure


def names(record):
  return {kind: record["kinds"][kind]["name"] for kind in kernels.KINDS}


def test_choose_measures_once_per_machine_and_keeps_only_exact_enough_kernels(
    tmp_path, monkeypatch):
  monkeypatch.setenv("JAXLAB_CACHE_DIR", str(tmp_path))
  calls = []
  # ynn_dot is fastest on both float32 steps, but its gradients on the conv step are off by
  # 1e-2: not float rounding. In bf16 it is slower than XLA on the dense step (its bfloat16
  # dots; as on a Xeon with AMX) and faster on the conv step: each precision gets its own.
  monkeypatch.setattr(kernels, "measure", fake_measure(
      {"conv": {"xla": 1.0, "ynn_dot": 0.3}, "dense": {"xla": 1.0, "ynn_dot": 0.9},
       "conv_bf16": {"xla": 1.1, "ynn_dot": 0.33}, "dense_bf16": {"xla": 0.6, "ynn_dot": 2.1}},
      {"conv": {"xla": 1e-6, "ynn_dot": 1e-2}, "dense": {"xla": 1e-6, "ynn_dot": 1e-6},
       "conv_bf16": {"xla": 1e-3, "ynn_dot": 1e-3}, "dense_bf16": {"xla": 1e-3, "ynn_dot": 1e-3}},
      calls))
  record = kernels.choose(log=lambda s: None)
  assert names(record) == {"conv": "xla", "dense": "ynn_dot", "conv_bf16": "ynn_dot",
                           "dense_bf16": "xla"}
  assert record["kinds"]["dense"]["xla_flags"] == kernels.KERNELS["ynn_dot"]
  # bf16 against float32, each under its own kernels: 0.33 / 1.0 and 0.6 / 0.9.
  assert record["bf16_vs_float32"] == pytest.approx({"conv": 0.33, "dense": 0.6 / 0.9})
  conv = record["kinds"]["conv"]["candidates"]["ynn_dot"]
  assert conv["same_results"] is False and conv["relative_error"] == pytest.approx(1e-2)
  assert len(calls) == 1
  assert kernels.choose(log=lambda s: None) == record and len(calls) == 1  # From the cache.
  cached = json.loads((tmp_path / "kernels.json").read_text())
  assert list(cached) == [kernels.machine_key()]
  # Another jaxlib (or CPU) is another key: measured again, the first record kept.
  monkeypatch.setattr(kernels, "machine_key", lambda: "another machine")
  monkeypatch.setattr(kernels, "measure", fake_measure(
      {kind: {"xla": 1.0, "ynn_dot": 0.97} for kind in kernels.KINDS},
      {kind: {"xla": 1e-6, "ynn_dot": 1e-6} for kind in kernels.KINDS}, calls))
  # Within the timing noise: XLA as it comes.
  assert names(kernels.choose(log=lambda s: None)) == dict.fromkeys(kernels.KINDS, "xla")
  assert len(json.loads((tmp_path / "kernels.json").read_text())) == 2
  # A record of another form (an older jaxlab's, one choice for all models) is measured again.
  cached = json.loads((tmp_path / "kernels.json").read_text())
  cached["another machine"] = {"name": "ynn_dot", "xla_flags": kernels.KERNELS["ynn_dot"]}
  (tmp_path / "kernels.json").write_text(json.dumps(cached))
  assert "kinds" in kernels.choose(log=lambda s: None) and len(calls) == 3


def test_of_kernels_within_the_margin_the_simplest_is_chosen(tmp_path, monkeypatch):
  monkeypatch.setenv("JAXLAB_CACHE_DIR", str(tmp_path))
  monkeypatch.setattr(kernels, "CANDIDATES", ("xla", "ynn_dot", "ynn_dot_eltwise"))
  monkeypatch.setattr(kernels, "measure", fake_measure(
      {kind: {"xla": 1.0, "ynn_dot": 0.51, "ynn_dot_eltwise": 0.5} for kind in kernels.KINDS},
      {kind: {"xla": 1e-6, "ynn_dot": 1e-6, "ynn_dot_eltwise": 1e-6} for kind in kernels.KINDS},
      []))
  assert names(kernels.choose(log=lambda s: None)) == dict.fromkeys(kernels.KINDS, "ynn_dot")


def test_a_failed_measurement_is_a_bug_with_its_traceback_and_is_not_cached(tmp_path,
                                                                            monkeypatch):
  """A measurement that fails outside any candidate (a candidate's crash is an error of that
  candidate, above) is a bug: it raises, with the measuring process's traceback in its message,
  and a script shows it as a traceback with status 1; nothing is cached."""
  monkeypatch.setenv("JAXLAB_CACHE_DIR", str(tmp_path))

  def broken(out, repeats=9):
    raise RuntimeError("the measuring process died")
  monkeypatch.setattr(kernels, "measure", broken)
  with pytest.raises(RuntimeError, match="died"):
    kernels.choose(log=lambda s: None)
  assert not (tmp_path / "kernels.json").exists()
  monkeypatch.setattr(kernels, "_backend_started", lambda: False)
  monkeypatch.setattr(kernels, "gpu_possible", lambda: False)
  for name in ("XLA_FLAGS", kernels.APPLIED_ENV):  # Put back as they were after the test.
    monkeypatch.setenv(name, os.environ.get(name, ""))
  done = run_main("profile_step.py", "--experiment=mlp_baseline", "--kernels=auto")
  assert done.returncode == 1 and "Traceback (most recent call last)" in done.stderr
  assert "RuntimeError: the measuring process died" in done.stderr
  assert not [l for l in done.stderr.splitlines() if l.startswith("error:")]


# A measuring process that reports items a, b, c; the items named in $CRASH kill it (SIGILL,
# as an XLA abort does) after its last words, and $FAIL ends it outside any item.
FAKE_MEASURER = """
import json, os, signal, sys
from jaxlab.training.kernels import Reporter
report = Reporter(sys.argv[1])
for item in "abc":
  if item in report.skip:
    continue
  report.trying(item)
  if item in os.environ.get("CRASH", ""):
    print("W1202 12:00:00.000 logged by XLA", file=sys.stderr)
    print("partition compile failed", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGILL)
  report.tried(item)
  report.result(item, {"item": item, "pid": os.getpid()})
if os.environ.get("FAIL"):
  sys.exit("no data")
"""


@pytest.mark.slow
def test_an_item_that_kills_the_measuring_process_is_reported_and_the_rest_measured(tmp_path):
  (tmp_path / "measurer.py").write_text(FAKE_MEASURER)
  argv = [sys.executable, str(tmp_path / "measurer.py")]
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
  results, crashed = kernels.isolated(argv, {**env, "CRASH": "b"})
  assert [r["item"] for r in results.values()] == ["a", "c"]
  assert results["a"]["pid"] != results["c"]["pid"]  # c in a new process, a not measured again.
  assert crashed == {"b": "killed the process (SIGILL): partition compile failed"}
  assert kernels.isolated(argv, {**env, "CRASH": "abc"})[1].keys() == {"a", "b", "c"}
  with pytest.raises(RuntimeError, match=r"failed \(exit status 1\): no data\n\(outside any "
                     r"candidate: a bug.*\n(.*\n)*.*no data"):  # Its stderr: a traceback's place.
    kernels.isolated(argv, {**env, "FAIL": "1"})


def test_a_candidate_that_killed_the_measurement_is_an_error_never_chosen(tmp_path, monkeypatch):
  monkeypatch.setenv("JAXLAB_CACHE_DIR", str(tmp_path))
  monkeypatch.setattr(kernels, "CANDIDATES", ("xla", "ynn_dot", "onednn_dot"))
  why = "killed the process (SIGILL): partition compile failed"

  def isolated(argv, env=None, timeout=600):
    out = pathlib.Path(argv[-2])
    results = {}
    for kind in kernels.KINDS:
      np.savez(out / f"{kind}.exact.npz", **EXACT)
      results[kind] = {}
      for name, t in (("xla", 1.0), ("ynn_dot", 0.9)):
        np.savez(out / f"{kind}.{name}.npz", **EXACT)
        results[kind][name] = {"seconds": t, "vs_xla": t}
    return results, {"dense/onednn_dot": why}
  monkeypatch.setattr(kernels, "isolated", isolated)
  found = kernels.measure(tmp_path)
  assert list(found["dense"]) == ["xla", "ynn_dot", "onednn_dot"]  # In CANDIDATES' order.
  assert found["dense"]["onednn_dot"] == {"error": why}
  assert "onednn_dot" not in found["conv"]
  record = kernels.choose(log=lambda s: None)
  assert names(record) == dict.fromkeys(kernels.KINDS, "ynn_dot")
  assert record["kinds"]["dense"]["candidates"]["onednn_dot"] == {"error": why}
  assert (tmp_path / "kernels.json").exists()  # A measurement, cached: not measured again.


@pytest.mark.slow
def test_the_measurement_runs_every_candidate_on_both_steps_exact_to_float_rounding(tmp_path):
  """The real measurement, in its own process: every candidate compiles with its options and
  runs each kind's step, its gradients as close to float64 as float32 rounding allows (in
  bf16, as XLA's own bf16 gradients are, which are really rounded to bfloat16's precision)."""
  found = kernels.measure(tmp_path, repeats=1)
  assert set(found) == set(kernels.KINDS)
  error = lambda kind, name: kernels._error(tmp_path / f"{kind}.{name}.npz",
                                            tmp_path / f"{kind}.exact.npz")
  for kind in kernels.KINDS:
    assert list(found[kind]) == list(kernels.CANDIDATES)
    for name, c in found[kind].items():
      assert c["seconds"] > 0 and c["vs_xla"] > 0, (kind, name, c)
      if kind.endswith("_bf16"):
        assert 1e-4 < error(kind, name) <= 2 * error(kind, "xla"), (kind, name)
      else:
        assert error(kind, name) < 1e-4, (kind, name)
  assert found["conv"]["xla"]["vs_xla"] == 1.0


def test_auto_applies_the_choice_for_the_kind_of_model(tmp_path, monkeypatch):
  monkeypatch.setattr(kernels, "_backend_started", lambda: False)
  monkeypatch.setattr(kernels, "gpu_possible", lambda: False)
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setenv(kernels.APPLIED_ENV, "xla")  # Restored after, with XLA_FLAGS.
  record = {"kinds": {"conv": {"name": "ynn_dot"}, "dense": {"name": "xla"},
                      "conv_bf16": {"name": "ynn_dot"}, "dense_bf16": {"name": "xla"}}}
  monkeypatch.setattr(kernels, "choose", lambda: record)
  assert kernels.apply("auto", kind="conv") == "ynn_dot"
  assert os.environ["XLA_FLAGS"] == kernels.KERNELS["ynn_dot"]
  assert kernels.apply("auto", kind=lambda: "dense") == "xla" and os.environ["XLA_FLAGS"] == ""
  with pytest.raises(ValueError, match="unknown kind of model 'rnn'; known: conv, dense"):
    kernels.apply("auto", kind="rnn")
  asked = []
  for kind in record["kinds"]:  # One choice for all: the kind is not asked.
    record["kinds"][kind]["name"] = "ynn_dot"
  assert kernels.apply("auto", kind=lambda: asked.append(1) or "dense") == "ynn_dot"
  assert not asked


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


CONV_LAB = """
from jaxlab.experiment import Experiment, register
from jaxlab.models import ConvBlock, ConvNet, Conv, Dense, MaxPool
register(Experiment(name="kernels_tiny_cnn", dataset="mnist", epochs=1, batch_size=32,
                    model=ConvNet(blocks=(ConvBlock((Conv(4, 3, padding="same"),), MaxPool(2),
                                                    False, 0.0),), head=(Dense(8),))))
"""


@pytest.mark.slow
def test_auto_gives_each_kind_of_model_its_kernels_in_the_scripts(tmp_path):
  """train.py with --kernels=auto: an MLP gets the dense choice, in bf16 the dense bf16 one, a
  ConvNet in bf16 the conv bf16 one, from the cached record (nothing measured), recorded in each
  run's config.json; under bf16 one line says what bf16 does here, with the measured ratio."""
  from datafiles import write_idx_dataset

  (tmp_path / "cache").mkdir()
  (tmp_path / "cache" / "kernels.json").write_text(json.dumps({kernels.machine_key(): {
      "kinds": {"conv": {"name": "xla"}, "dense": {"name": "ynn_dot"},
                "conv_bf16": {"name": "ynn_dot"}, "dense_bf16": {"name": "xla"}},
      "bf16_vs_float32": {"conv": 1.2, "dense": 0.7}}}))
  (tmp_path / "conv_lab.py").write_text(CONV_LAB)
  write_idx_dataset(tmp_path / "data", n_train=64, n_test=32)
  env = {"JAXLAB_CACHE_DIR": str(tmp_path / "cache"), "JAXLAB_KERNELS": "auto"}
  for experiment, precision, want, notice, ratio in (
      ("mlp_halving", "float32", "ynn_dot", None, None),
      ("mlp_halving", "bf16", "xla", "bf16 on this CPU (", "a dense step takes 0.70"),
      ("kernels_tiny_cnn", "bf16", "ynn_dot", "warning: bf16 will not pay on this CPU (",
       "a conv step takes 1.20")):
    workdir = tmp_path / f"{experiment}_{precision}"
    done = script("train.py", f"--lab={tmp_path / 'conv_lab.py'}", f"--experiment={experiment}",
                  "--dataset=mnist", "--epochs=1", "--batch_size=32", f"--precision={precision}",
                  f"--data_dir={tmp_path / 'data'}", f"--workdir={workdir}", env=env)
    assert "measuring" not in done.stderr
    found = json.loads((workdir / "config.json").read_text())["environment"]
    assert (found["kernels"], found["xla_flags"]) == (
        want, f"{SCRIPT_XLA_FLAGS} {kernels.KERNELS[want]}".strip()), experiment
    lines = [l for l in done.stderr.splitlines() if "bf16" in l and "CPU" in l]
    if notice is None:
      assert not lines, lines
    else:
      assert len(lines) == 1 and lines[0].startswith(notice) and ratio in lines[0], lines


def test_kernels_are_measured_on_the_cpu_with_the_users_flags_and_none_of_jaxlabs(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", f"--xla_cpu_enable_fast_math=false {kernels.KERNELS['ynn_dot']}")
  monkeypatch.setenv("JAX_PLATFORMS", "cuda")
  env = kernels.measuring_environment()
  assert env["XLA_FLAGS"] == "--xla_cpu_enable_fast_math=false"
  assert env["JAX_PLATFORMS"] == "cpu"
