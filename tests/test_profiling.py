"""Profiling and benchmarking tools, on tiny settings; no timings are asserted."""

import json

import jax
import numpy as np
import pytest

from jaxlab.training import process
from jaxlab.training.state import setup
from jaxlab.perf import profiling
from jaxlab.perf import benchmark
from jaxlab.perf.benchmark import markdown, run_benchmark
from jaxlab.experiment import resolve_config
from jaxlab.training.hooks import OnEpochEnd
from jaxlab.training.train import train_and_evaluate
from datafiles import synthetic_dataset
from conftest import run_main


# A conv net of a user's lab file: AlexNet's kinds of layer (convolutions with and without
# padding, overlapping pooling, BatchNorm, Dropout, a Dense head) at a size that profiles fast.
CNN_LAB = """
from jaxlab.experiment import Experiment, register
from jaxlab.models import Conv, ConvBlock, ConvNet, Dense, MaxPool
register(Experiment(name="profiling_small_cnn", dataset="fashion_mnist", epochs=1,
                    model=ConvNet(blocks=(ConvBlock((Conv(8, 5),), MaxPool(3, 2), True, 0.25),
                                          ConvBlock((Conv(16, 3, padding="same"),),
                                                    MaxPool(2), True)),
                                  head=(Dense(32, "tanh", batch_norm=False, dropout=0.5),))))
"""


@pytest.fixture(scope="module")
def cnn_lab(tmp_path_factory):
  path = tmp_path_factory.mktemp("lab") / "profiling_lab.py"
  path.write_text(CNN_LAB)
  return path


@pytest.mark.slow
@pytest.mark.parametrize("experiment,batch", [("mlp_halving", 32), ("profiling_small_cnn", 4)])
def test_profile_step_json(tmp_path, cnn_lab, experiment, batch):
  out = run_main("profile_step.py", f"--lab={cnn_lab}", f"--experiment={experiment}",
                 f"--batch_size={batch}", "--steps=3", "--json",
                 f"--trace_dir={tmp_path / 'trace'}", f"--hlo_dir={tmp_path / 'hlo'}",
                 f"--checkpoint_dir={tmp_path / 'saves'}")
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout)
  # The saves were whole (the last one read back inside) and are gone; the size is the state's.
  saved = result["checkpoint"]
  assert not list((tmp_path / "saves").iterdir())
  # The train step's arguments are the state and a small batch: the file is about their size.
  arguments = result["train_step"]["argument_bytes"]
  assert abs(saved["bytes"] - arguments) < 0.05 * arguments + 100_000, (saved, arguments)
  assert saved["repeats"] == 3
  for key in ("sync_seconds", "async_blocking_seconds", "async_background_seconds",
              "bytes_alone_seconds"):
    assert saved[key] > 0, key
  assert "saving the train state" in profiling.format_table(result)
  assert result["batch_size"] == batch and result["matmul_peak_flops_per_second"] > 0
  for step in ("train_step", "eval_step"):
    r = result[step]
    assert r["xla_flops"] > 0 and r["model_flops"] > 0 and r["bytes_accessed"] > 0
    assert r["argument_bytes"] > 0 and r["median_step_seconds"] > 0 and r["compile_seconds"] > 0
    assert (tmp_path / "hlo" / f"{experiment}.{step}.hlo.txt").read_text().startswith("HloModule")
  # XLA's count of the train step's FLOPs is about 3x the forward Dense/Conv2D count.
  train = result["train_step"]
  assert 2.5 < train["xla_flops"] / (train["model_flops"] / 3) < 4.0
  traces = list((tmp_path / "trace").rglob("*.xplane.pb"))
  assert traces and traces[0].stat().st_size > 0
  breakdown = result["trace_breakdown"]
  assert breakdown["matmul_microseconds"] > 0 and breakdown["other_microseconds"] > 0
  assert 0 < breakdown["matmul_fraction"] < 1


def _hlo(f, *args) -> str:
  return jax.jit(f).lower(*args).compile().as_text()


def test_matmul_instructions_finds_dots_and_fusions_that_hold_them():
  x, w = np.ones((8, 16), np.float32), np.ones((16, 4), np.float32)
  hlo = _hlo(lambda x, w: jax.numpy.tanh(x @ w) * 2 + 1, x, w)
  matmuls = profiling.matmul_instructions(hlo)
  assert matmuls, hlo
  for name in matmuls:  # Each is a dot, or a fusion whose computation holds one.
    line = next(l for l in hlo.splitlines()
                if l.split("=")[0].split()[-1:] == [f"%{name}"])
    assert " dot(" in line or " fusion(" in line, line
  assert not profiling.matmul_instructions(_hlo(lambda x: jax.numpy.tanh(x) * 2 + x.sum(), x))
  conv = _hlo(lambda x, k: jax.lax.conv(x, k, (1, 1), "SAME"), np.ones((1, 2, 8, 8), np.float32),
              np.ones((3, 2, 3, 3), np.float32))
  assert profiling.matmul_instructions(conv)


def test_profile_step_table():
  out = run_main("profile_step.py", "--experiment=mlp_baseline", "--batch_size=16",
                 "--steps=2").stdout
  assert "median step (ms)" in out and "fraction of peak" in out


@pytest.mark.slow
def test_second_run_does_not_recompile(tmp_path):
  config = resolve_config("mlp_diamond", dataset="mnist", epochs=2, batch_size=32,
                          steps_per_dispatch=4, eval_batch_size=64)
  ds = synthetic_dataset()
  train_and_evaluate(config, tmp_path / "a", dataset=ds)
  with process.CompileCounter() as counter:
    train_and_evaluate(config, tmp_path / "b", dataset=ds)
  assert counter.count == 0


@pytest.mark.slow
def test_epochs_after_the_first_do_not_compile(tmp_path):
  config = resolve_config("mlp_wide_narrow", dataset="mnist", epochs=3, batch_size=32,
                          steps_per_dispatch=3, eval_batch_size=64)
  ds = synthetic_dataset(n_train=250)  # 7 full batches (chunks 3, 3, 1) and one of 26.
  counts = []
  jax.clear_caches()  # Programs another test compiled would not count as this run's.
  with process.CompileCounter() as counter:
    train_and_evaluate(config, tmp_path, dataset=ds,
                       hooks=[OnEpochEnd(lambda epoch, record, state: counts.append(counter.count))])
  assert counts[0] > 0 and counts[1] == counts[2] == counts[0]


@pytest.mark.slow
def test_resumed_run_compiles_what_a_fresh_run_does(tmp_path):
  config = resolve_config("mlp_wide_narrow", dataset="mnist", epochs=2, batch_size=32,
                          steps_per_dispatch=3, eval_batch_size=64)
  ds = synthetic_dataset(n_train=250)
  train_and_evaluate(config, tmp_path / "a", dataset=ds)
  train_and_evaluate(resolve_config("mlp_wide_narrow", dataset="mnist", epochs=1, batch_size=32,
                                    steps_per_dispatch=3, eval_batch_size=64),
                     tmp_path / "b", dataset=ds)
  with process.CompileCounter() as counter:  # Restored state: same types, no new programs.
    train_and_evaluate(config, tmp_path / "b", dataset=ds)
  assert counter.count == 0


def test_compile_counter_sees_compilations():
  with process.CompileCounter() as counter:
    jax.jit(lambda x: x * 3 + 1)(np.arange(7.0))
  assert counter.count >= 1


@pytest.mark.slow
def test_benchmark_runs_jaxlab_and_keras_on_a_tiny_setting():
  model = setup(resolve_config("mlp_halving"))
  result = run_benchmark(model, 10, batch_size=32, examples=96, epochs=2, peers=["keras_fit"],
                         peak_flops=1e9, log=lambda s: None)
  for name in ("jaxlab", "keras_fit"):
    assert len(result["results"][name]["epoch_seconds"]) == 2
    assert result["results"][name]["median_epoch_seconds"] > 0
  assert result["ratios_jaxlab_over_peer"]["keras_fit"] > 0
  assert result["flops_per_epoch"] == pytest.approx(3 * 96 * 2 * sum(
      a * b for a, b in [(784, 512), (512, 256), (256, 128), (128, 64), (64, 32), (32, 10)]))
  table = markdown(result, "tiny")
  assert "| jaxlab |" in table and "| keras_fit |" in table and "FLOP floor" in table


def test_benchmark_interleaves_the_loops_epochs_in_rotating_rounds(monkeypatch):
  calls = []

  def fake(name):
    def make(model, images, labels, batch_size, members=1):
      def run():
        calls.append(name)
        return float(len(calls))  # The call's position: 1, 2, 3, ...
      return run
    return make

  monkeypatch.setattr(benchmark, "jaxlab_runner", fake("jaxlab"))
  monkeypatch.setitem(benchmark.PEERS, "keras_fit", fake("keras"))
  monkeypatch.setitem(benchmark.PEERS, "torch_eager", fake("torch"))
  result = run_benchmark(setup(resolve_config("mlp_halving")), 10, 32, 64, 3, ["keras_fit", "torch_eager"],
                         peak_flops=1e9, log=lambda s: None)
  assert calls == ["jaxlab", "keras", "torch",  # Warm-up epochs, then three rotated rounds.
                   "jaxlab", "keras", "torch", "keras", "torch", "jaxlab", "torch", "jaxlab",
                   "keras"]
  r = result["results"]
  assert r["jaxlab"]["warmup_seconds"] == 1 and r["jaxlab"]["epoch_seconds"] == [4, 9, 11]
  assert r["keras_fit"]["epoch_seconds"] == [5, 7, 12]
  assert r["torch_eager"]["median_epoch_seconds"] == 8
  assert result["ratios_jaxlab_over_peer"] == {"keras_fit": 9 / 7, "torch_eager": 9 / 8}
  assert result["round_ratios_jaxlab_over_peer"]["keras_fit"] == [4 / 5, 9 / 7, 11 / 12]
  assert "| keras_fit | 7.000 | 1.29 | 0.92 (0.80-1.29) |" in markdown(result, "fake")


def test_benchmark_members_train_one_group_against_peers_one_after_another(monkeypatch):
  made = []

  def jaxlab(model, images, labels, batch_size, members=1):
    made.append(("jaxlab", members))
    return lambda: 3.0

  def keras(model, images, labels, batch_size):
    made.append(("keras", 1))
    return lambda: 2.0

  monkeypatch.setattr(benchmark, "jaxlab_runner", jaxlab)
  monkeypatch.setitem(benchmark.PEERS, "keras_fit", keras)
  model = setup(resolve_config("mlp_halving"))
  result = run_benchmark(model, 10, 32, 64, 2, ["keras_fit"], peak_flops=1e9,
                         log=lambda s: None, members=4)
  assert made == [("jaxlab", 4)] + [("keras", 1)] * 4  # One group; four Keras models.
  assert result["results"]["keras_fit"]["epoch_seconds"] == [8.0, 8.0]  # Each trains an epoch.
  assert result["ratios_jaxlab_over_peer"] == {"keras_fit": 3 / 8}
  assert result["flops_per_epoch"] == 4 * run_benchmark(
      model, 10, 32, 64, 1, [], peak_flops=1e9, log=lambda s: None)["flops_per_epoch"]
  assert "4 members: jaxlab trains them as one vmapped group" in markdown(result, "fake")


def test_benchmark_floor_uses_the_best_peak_measured_after_each_round(monkeypatch):
  monkeypatch.setattr(benchmark, "jaxlab_runner", lambda *args, members=1: lambda: 2.0)
  peaks = iter([3e9, 5e9, 4e9])
  monkeypatch.setattr(profiling, "matmul_peak_flops", lambda dtype: next(peaks))
  model = setup(resolve_config("mlp_halving"))
  result = run_benchmark(model, 10, 32, 64, 3, [], log=lambda s: None)
  assert result["matmul_peak_measurements"] == [3e9, 5e9, 4e9]
  assert result["matmul_peak_flops_per_second"] == 5e9
  assert result["flop_floor_seconds"] == pytest.approx(result["flops_per_epoch"] / 5e9)
  assert "best of 3 matmul peak measurements" in markdown(result, "fake")


def test_benchmark_rejects_unknown_peer():
  with pytest.raises(ValueError, match="unknown peer 'tf'; known: keras_fit, torch_eager"):
    run_benchmark(setup(resolve_config("mlp_halving")), 10, 32, 64, 1, ["tf"], peak_flops=1e9,
                  log=lambda s: None)


# Optimized XLA:CPU programs as this jaxlib prints them (trimmed): a bfloat16 matmul in a
# YNNPACK fusion, computed in float32 between converts; a convolution left to XLA's own kernels
# beside one in a YNNPACK fusion; a oneDNN custom call.
YNN_BF16_DOT = """HloModule jit_f
%fused_computation (param_0.2: bf16[512,2048], param_1.2: bf16[2048,512]) -> bf16[512,512] {
  %convert.3 = f32[512,2048]{1,0} convert(%param_0.2)
  %convert.4 = f32[2048,512]{1,0} convert(%param_1.2)
  %dot_general.0 = f32[512,512]{1,0} dot(%convert.3, %convert.4), lhs_contracting_dims={1}
  ROOT %convert.5 = bf16[512,512]{1,0} convert(%dot_general.0)
}
ENTRY %main.1 (a.1: bf16[512,2048], b.1: bf16[2048,512]) -> bf16[512,512] {
  ROOT %ynn_fusion = bf16[512,512]{1,0} fusion(%a.1, %b.1), kind=kCustom, calls=%fused_computation, backend_config={"fusion_config":{"kind":"__ynn_fusion"}}
}
"""
TWO_CONVS = """HloModule jit_g
%fused_computation.1 (param_0: f32[16,28,28,96], param_1: f32[5,5,96,256]) -> f32[16,28,28,256] {
  ROOT %conv.0 = f32[16,28,28,256]{3,2,1,0} convolution(%param_0, %param_1), window={size=5x5}
}
ENTRY %main.2 (x: f32[16,28,28,96], w: f32[5,5,96,256]) -> f32[16,28,28,256] {
  %conv.1 = f32[16,28,28,256]{3,2,1,0} convolution(%x, %w), window={size=5x5}
  ROOT %ynn_fusion = f32[16,28,28,256]{3,2,1,0} fusion(%x, %w), kind=kCustom, calls=%fused_computation.1, backend_config={"fusion_config":{"kind":"__ynn_fusion"}}
}
"""
# A YNNPACK dot that reads bfloat16 and writes float32, as YNNPACK's bf16 kernels do.
YNN_BF16_IN_F32_OUT = """HloModule jit_k
%fused_computation.7 (param_0.7: bf16[512,2048], param_1.7: bf16[2048,512]) -> f32[512,512] {
  %param_0.7 = bf16[512,2048]{1,0} parameter(0)
  %param_1.7 = bf16[2048,512]{1,0} parameter(1)
  ROOT %dot.7 = f32[512,512]{1,0} dot(%param_0.7, %param_1.7), lhs_contracting_dims={1}
}
ENTRY %main.7 (a.7: bf16[512,2048], b.7: bf16[2048,512]) -> f32[512,512] {
  ROOT %ynn_fusion.7 = f32[512,512]{1,0} fusion(%a.7, %b.7), kind=kCustom, calls=%fused_computation.7, backend_config={"fusion_config":{"kind":"__ynn_fusion"}}
}
"""
ONEDNN_FUSION = """HloModule jit_m
%fused_computation (param_0: bf16[128,512], param_1: bf16[512,10]) -> bf16[128,10] {
  %param_0 = bf16[128,512]{1,0} parameter(0)
  %param_1 = bf16[512,10]{1,0} parameter(1)
  ROOT %dot.4 = bf16[128,10]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}
ENTRY %main (x: bf16[128,512], w: bf16[512,10]) -> bf16[128,10] {
  ROOT %onednn_fusion = bf16[128,10]{1,0} fusion(%x, %w), kind=kCustom, calls=%fused_computation, backend_config={"fusion_config":{"kind":"__onednn_fusion"},"outer_dimension_partitions":[]}
}
"""
ONEDNN = """HloModule jit_h
ENTRY %main.3 (a: bf16[64,64], b: bf16[64,64]) -> bf16[64,64] {
  ROOT %custom-call = bf16[64,64]{1,0} custom-call(%a, %b), custom_call_target="__onednn$matmul"
}
"""


def test_library_of_names_each_ops_library_and_the_dtype_it_reads():
  assert profiling.library_of(YNN_BF16_DOT) == "ynnpack f32"
  assert profiling.library_of(TWO_CONVS) == "ynnpack f32 + xla f32"
  assert profiling.library_of(ONEDNN) == "onednn bf16"
  # What the op reads, not what it writes: bfloat16 in, float32 out is a bfloat16 dot.
  assert profiling.library_of(YNN_BF16_IN_F32_OUT) == "ynnpack bf16"
  assert profiling.library_of(ONEDNN_FUSION) == "onednn bf16"
  assert profiling.library_of("HloModule empty\nENTRY %main () -> f32[] {\n}\n") == "none"


@pytest.mark.slow
def test_probe_kernels_reports_each_option_and_names_a_refused_one():
  rows = profiling.probe_kernels({"xla": {}, "bogus": {"xla_no_such_option": True}},
                                 dtypes=("float32",), steps=1)
  assert [(r["op"], r["kernels"]) for r in rows] == [
      (op, name) for op in profiling.PROBE_OPS for name in ("xla", "bogus")]
  assert profiling.PROBE_OPS == ("matmul", "conv", "conv_backward", "mlp_backward")
  for r in rows:
    if r["kernels"] == "xla":
      # The backward pass is two convolutions (input and kernel gradients), maybe fused apart.
      assert r["library"].split(" + ")[0].split()[1] == "f32" and r["gflops"] > 0, r
    else:
      assert "xla_no_such_option" in r["error"] and "gflops" not in r, r


def test_probe_kernels_script_names_a_bad_dtype():
  done = run_main("probe_kernels.py", "--dtypes=float32,float16")
  assert done.returncode == 2
  assert "error: unknown dtype 'float16'; known: float32, bfloat16" in done.stderr


def test_the_model_peak_weighs_each_kind_of_layer_by_the_peak_of_its_precision():
  """A 3x3 convolution (4 filters, 26x26 positions), pooled to 13x13x4, a Dense of 8 and the
  output Dense of 10, counted by hand; under bf16 on the CPU the dots run at the bf16 peak and
  the convolution at float32's: the time is the sum of each kind's FLOPs over its peak."""
  from jaxlab.models import Conv, ConvBlock, ConvNet, Dense, MaxPool, at_precision, flops_by_kind
  from jaxlab.inspection.summary import forward_flops
  model = ConvNet(blocks=(ConvBlock((Conv(4, 3),), MaxPool(2), False),), head=(Dense(8),))
  shape = (28, 28, 1)
  conv, dense = 2 * 3 * 3 * 1 * 4 * 26 * 26, 2 * 13 * 13 * 4 * 8 + 2 * 8 * 10
  assert flops_by_kind(model, shape) == {"conv2d": conv, "dense": dense}
  assert forward_flops(model, shape) == conv + dense
  peaks = {"float32": 1e9, "bf16": 4e9}
  mixed = at_precision(model, "bf16", backend="cpu")
  assert flops_by_kind(mixed, shape) == {"conv2d": conv, "dense": dense}  # Inside the mixed dots.
  assert profiling.model_peak_flops(mixed, shape, peaks) == pytest.approx(
      (conv + dense) / (conv / 1e9 + dense / 4e9), rel=1e-12)
  assert profiling.model_peak_flops(model, shape, peaks) == pytest.approx(1e9, rel=1e-12)
