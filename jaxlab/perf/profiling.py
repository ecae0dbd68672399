"""Profiling compiled steps: compile time, XLA cost and memory analysis, timed steps, peak FLOP/s.

  profile(config, steps=50)   an experiment's train and eval steps, compiled and timed (what
                              scripts/profile_step.py prints, as a table: `format_table`)

Everything here works on whatever backend JAX picked (CUDA GPU or CPU), for any experiment's
model. Timings synchronize with `block_until_ready` on the outputs; each figure is the median
over many runs after a warm-up.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp


@dataclasses.dataclass
class CompiledStats:
  """What XLA says about one compiled function, and how long compiling it took."""

  compile_seconds: float
  flops: float
  bytes_accessed: float
  argument_bytes: int
  output_bytes: int
  temp_bytes: int
  hlo_text: str = dataclasses.field(repr=False, default="")


def _first(analysis: Any) -> dict[str, Any]:
  # Older JAX returns a list with one dict per device program; newer returns the dict.
  if isinstance(analysis, (list, tuple)):
    return analysis[0] if analysis else {}
  return analysis or {}


def compile_stats(jitted: Callable, *args, **kwargs) -> tuple[Any, CompiledStats]:
  """Lowers and compiles `jitted` for these arguments; returns the executable and its stats."""
  start = time.perf_counter()
  lowered = jitted.lower(*args, **kwargs)
  compiled = lowered.compile()
  seconds = time.perf_counter() - start
  cost = _first(compiled.cost_analysis())
  memory = compiled.memory_analysis()
  stats = CompiledStats(
      compile_seconds=seconds,
      flops=float(cost.get("flops", 0.0)),
      bytes_accessed=float(cost.get("bytes accessed", 0.0)),
      argument_bytes=int(getattr(memory, "argument_size_in_bytes", 0)),
      output_bytes=int(getattr(memory, "output_size_in_bytes", 0)),
      temp_bytes=int(getattr(memory, "temp_size_in_bytes", 0)),
      hlo_text=compiled.as_text() or "")
  return compiled, stats


def median_seconds(run: Callable[[], Any], steps: int, warmup: int = 3) -> float:
  """Median wall time of `run()` over `steps` calls after `warmup`, each call synchronized."""
  for _ in range(warmup):
    jax.block_until_ready(run())
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(run())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def matmul_peak_flops(precision: str = "float32", size: int | None = None,
                      steps: int = 10) -> float:
  """The machine's measured matrix-multiply rate (FLOP/s) in `precision`, from square products:
  "float32", or "bf16", the op a model's bfloat16 dots run (bfloat16 operands, accumulated and
  written in float32)."""
  if size is None:
    size = 8192 if jax.default_backend() == "gpu" else 2048
  dtype = jnp.bfloat16 if precision == "bf16" else jnp.float32
  keys = jax.random.split(jax.random.PRNGKey(0), 2)
  a = jax.random.normal(keys[0], (size, size), dtype)
  b = jax.random.normal(keys[1], (size, size), dtype)
  matmul = jax.jit(lambda a, b: jax.lax.dot(a, b, preferred_element_type=jnp.float32))
  seconds = median_seconds(lambda: matmul(a, b), steps)
  return 2.0 * size ** 3 / seconds


def model_peak_flops(model: Any, image_shape: Any, peaks: dict[str, float]) -> float:
  """The rate (FLOP/s) at which `model`'s dot and convolution FLOPs could run if each ran at the
  measured matmul peak of the precision it computes in (`peaks`: "float32", "bf16"): under bf16
  on a CPU, dots in bfloat16 and convolutions in float32 (jaxlab.models.at_precision)."""
  from jaxlab.models import flops_by_kind, op_precisions
  flops, precisions = flops_by_kind(model, image_shape), op_precisions(model)
  seconds = sum(n / peaks[precisions[kind]] for kind, n in flops.items() if n)
  return sum(flops.values()) / seconds if seconds else max(peaks.values())


def write_trace(run: Callable[[], Any], trace_dir: str | pathlib.Path, steps: int = 5) -> None:
  """Records a `jax.profiler` trace of `steps` calls (opens in TensorBoard or Perfetto)."""
  jax.block_until_ready(run())
  with jax.profiler.trace(str(trace_dir)):
    for i in range(steps):
      with jax.profiler.StepTraceAnnotation("step", step_num=i):
        jax.block_until_ready(run())


# Host-side wrappers in a trace: they contain the device work rather than being part of it.
_WRAPPERS = ("ThunkExecutor", "PjitFunction", "Execute", "$", "step", "ParseArguments",
             "Handle inputs", "CreateOutputs", "train", "TfrtCpu", "PjRt", "CommonPjRt",
             "SlinkyThreadPool")


Event = tuple[str, float, dict[str, Any]]  # (name, microseconds, args) of one traced operation.


def device_events(trace_dir: str | pathlib.Path) -> list[Event]:
  """The device work in the newest trace under `trace_dir`, read once for `top_ops` and
  `op_breakdown`.

  On a GPU these are the kernels on the device's streams; on the CPU, XLA's thunks (fusions,
  dots, convolutions). Host-side wrappers (dispatch, Python frames) are left out.
  """
  import gzip

  files = sorted(pathlib.Path(trace_dir).rglob("*.trace.json.gz"))
  if not files:
    raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir}")
  with gzip.open(files[-1]) as f:
    events = json.load(f)["traceEvents"]
  processes = {e["pid"]: e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "process_name"}
  device_pids = {pid for pid, name in processes.items() if "/device:" in name}
  found = []
  for e in events:
    if e.get("ph") != "X":
      continue
    if device_pids:
      if e["pid"] not in device_pids:
        continue
    elif e["name"].startswith(_WRAPPERS):
      continue
    found.append((e["name"], e.get("dur", 0), e.get("args") or {}))
  return found


def top_ops(events: list[Event], n: int = 15) -> list[dict[str, Any]]:
  """The `n` costliest operations of a trace's `device_events`, by total time."""
  import collections

  total: collections.Counter = collections.Counter()
  calls: collections.Counter = collections.Counter()
  for name, us, _ in events:
    total[name] += us
    calls[name] += 1
  grand = sum(total.values()) or 1
  return [{"name": name, "microseconds": us, "calls": calls[name], "fraction": us / grand}
          for name, us in total.most_common(n)]


# Library calls that multiply matrices or convolve: custom-call targets in HLO, kernel names in
# GPU traces.
_LIBRARY_MATMUL = re.compile(r"gemm|conv|cublas|cudnn|xmma|cutlass", re.IGNORECASE)
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([^\s(]+)\s*\(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT\s+)?%?([^\s=]+)\s*=\s*.*?\s([a-z][\w-]*)\((.*)$")


def matmul_instructions(hlo_text: str) -> set[str]:
  """Names of the optimized HLO's instructions that multiply matrices or convolve: dots and
  convolutions, library calls for them (custom calls), and fusions whose computation holds one
  (on the CPU, XLA's YNNPACK dot fusions). Loops and calls are not counted: the instructions
  inside them are, where they appear in a trace."""
  computations: dict[str, list[tuple[str, str, str]]] = {}
  current: list[tuple[str, str, str]] | None = None
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      current = computations.setdefault(header.group(1), [])
      continue
    instruction = _INSTRUCTION.match(line)
    if instruction and current is not None:
      current.append(instruction.groups())

  def is_matmul(opcode: str, rest: str, seen: frozenset) -> bool:
    if opcode in ("dot", "convolution"):
      return True
    if opcode == "custom-call":
      target = re.search(r'custom_call_target="([^"]*)"', rest)
      return bool(target and _LIBRARY_MATMUL.search(target.group(1)))
    if opcode == "fusion":
      called = re.search(r"calls=%?([^\s,}]+)", rest)
      if called and called.group(1) not in seen:
        name = called.group(1)
        return any(is_matmul(op, r, seen | {name}) for _, op, r in computations.get(name, ()))
    return False

  return {name for body in computations.values() for name, opcode, rest in body
          if is_matmul(opcode, rest, frozenset())}


def op_breakdown(events: list[Event], hlo_text: str) -> dict[str, float]:
  """How a trace's device time (its `device_events`) splits between matrix multiplies (and convolutions) and the
  rest. Events are matched to `hlo_text`'s instructions by name (or by their `hlo_op`
  argument); on a GPU, library kernels are also recognized by name (gemm, conv, ...).

  The times are sums of the operations' durations: on the CPU, XLA runs independent
  operations at the same time (a layer's two backward matmuls, for one), so each of those
  lasts longer than it would alone and the sum exceeds the wall time. Tracing also adds a
  small cost to every operation, which weighs most on the many small non-matmul ones.
  """
  matmuls = matmul_instructions(hlo_text)
  matmul = other = 0.0
  for name, us, args in events:
    op = args.get("hlo_op", name)
    if op in matmuls or name in matmuls or _LIBRARY_MATMUL.search(name):
      matmul += us
    else:
      other += us
  total = matmul + other
  return {"matmul_microseconds": matmul, "other_microseconds": other,
          "matmul_fraction": matmul / total if total else 0.0}


def checkpoint_cost(state: Any, directory: str | pathlib.Path, repeats: int = 3) -> dict[str, Any]:
  """What saving `state` costs the training loop, synchronously and in the background, against
  writing as many bytes alone (fsynced, atomically) to the same `directory`.

  Synchronous: the loop waits for the host copy, serialization and the fsynced write.
  Background (`checkpoint.AsyncWriter`, as a run's checkpoints are saved): the loop waits for the
  host copy and the hand-over only; the write's own time is measured too. The host copies are
  made into the same buffers each time (`checkpoint.HostCopies`), as the loop makes them.
  Medians of `repeats` saves of the same state. The last background save is read back and
  must hold the state; what was written is then removed."""
  from jaxlab.rundir import checkpoint
  from jaxlab.files import write_atomic

  directory = pathlib.Path(directory)
  target = checkpoint.checkpoint_template(state)
  sync_writer, async_writer = checkpoint.AsyncWriter(background=False), checkpoint.AsyncWriter()
  copies = checkpoint.HostCopies()  # Each save is on disk before the next copy overwrites it.
  sync, blocked, background, alone = [], [], [], []
  try:
    for i in range(repeats):
      t0 = time.perf_counter()
      sync_writer.save(directory / f"sync_{i}.msgpack", copies.copy(target), {})
      sync.append(time.perf_counter() - t0)
      t0 = time.perf_counter()
      async_writer.save(directory / f"async_{i}.msgpack", copies.copy(target), {})
      t1 = time.perf_counter()
      async_writer.wait()
      blocked.append(t1 - t0)
      background.append(time.perf_counter() - t1)
      data = bytes((directory / "sync_0.msgpack").stat().st_size)
      t0 = time.perf_counter()
      write_atomic(directory / f"bytes_{i}", data)
      alone.append(time.perf_counter() - t0)
      del data
  finally:
    async_writer.close()
  size = (directory / "sync_0.msgpack").stat().st_size
  _, saved = checkpoint.read(directory / f"async_{repeats - 1}.msgpack")
  if checkpoint.fingerprint(saved) != checkpoint.fingerprint(checkpoint.to_host(target)):
    raise AssertionError(f"the background save {directory / f'async_{repeats - 1}.msgpack'} "
                         "does not hold the state it was handed")
  for i in range(repeats):
    for name in (f"sync_{i}.msgpack", f"async_{i}.msgpack", f"bytes_{i}"):
      (directory / name).unlink(missing_ok=True)
  return {"bytes": size, "repeats": repeats,
          "sync_seconds": statistics.median(sync),
          "async_blocking_seconds": statistics.median(blocked),
          "async_background_seconds": statistics.median(background),
          "bytes_alone_seconds": statistics.median(alone)}


# XLA:CPU's other oneDNN options, probed beside jaxlab.training.kernels' candidates (onednn_dot among
# them). The custom calls need a jaxlib built with oneDNN's asynchronous runtime (jaxlib 0.10.2
# accepts the option and changes nothing); whether bfloat16 stays bfloat16 in oneDNN (and
# reaches AMX) depends on the CPU (AVX512-BF16).
ONEDNN_OPTIONS: dict[str, dict[str, Any]] = {
    "onednn_custom_call": {"xla_cpu_use_onednn": True,
                           "xla_cpu_experimental_onednn_custom_call": True},
    "onednn_dot_eltwise": {"xla_cpu_use_onednn": True,
                           "xla_cpu_experimental_onednn_fusion_type":
                           "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE"},
}


def library_of(hlo_text: str) -> str:
  """Which library each dot and convolution of an optimized XLA:CPU program runs in, and in
  which dtype: "ynnpack" (inside a YNNPACK fusion), "onednn" (a oneDNN custom call or fusion)
  or "xla" (XLA's own, through Eigen), each with the dtype of its first operand ("xla f32":
  what the op reads, bfloat16 only where no conversion to float32 came first, whatever dtype
  it accumulates or writes in); several joined by " + ", in the program's order."""
  computations = re.split(r"\n(?=\S)", hlo_text)
  caller_kind = {}  # fused computation -> the fusion kind of the instruction that calls it
  for line in hlo_text.splitlines():
    called = re.search(r"calls=%?([\w.\-]+)", line)
    if called:
      kind = re.search(r'"kind":"(\w+)"', line)
      caller_kind[called.group(1)] = kind.group(1) if kind else ""
  found = []
  for computation in computations:
    lines = computation.splitlines()
    if not lines:
      continue
    name = re.match(r"(?:ENTRY\s+)?%?([\w.\-]+)", lines[0])
    header = lines[0].split("->")[0]
    dtypes = dict(re.findall(r"%?([\w.\-]+):\s*(\w+)\[", header))  # Its parameters.
    for line in lines[1:]:
      defined = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\w+)\[", line)
      if defined:
        dtypes[defined.group(1)] = defined.group(2)
      op = re.search(r"=\s*\w+\[[^\]]*\][^ ]*\s+(convolution|dot|custom-call)\(%?([\w.\-]+)",
                     line)
      if not op:
        continue
      opcode, operand = op.groups()
      if opcode == "custom-call":
        if "onednn" not in line.lower():
          continue
        library = "onednn"
      else:
        kind = caller_kind.get(name.group(1) if name else "", "").lower()
        library = "ynnpack" if "ynn" in kind else "onednn" if "onednn" in kind else "xla"
      found.append(f"{library} {dtypes.get(operand, '?')}")
  return " + ".join(dict.fromkeys(found)) or "none"


PROBE_OPS = ("matmul", "conv", "conv_backward", "mlp_backward")


def probe_kernels(options: dict[str, dict[str, Any]], dtypes=("float32", "bfloat16"),
                  steps: int = 5, log: Callable[[str], None] = lambda s: None
                  ) -> list[dict[str, Any]]:
  """For each dtype, op of `PROBE_OPS` and named set of XLA:CPU compiler options: the libraries
  and dtypes its dots and convolutions run in (`library_of`) and the measured rate (median of
  `steps` calls). The ops: a matmul (2048 x 2048 by 2048), a convolution (AlexNet's second:
  batch 16, 28x28x96 by 5x5x96x256, `same`), that convolution's backward pass (the gradients to
  its input and kernel, as training runs it), and an MLP's training step (the gradients of
  `jaxlab.training.kernels`' dense step: Lab 02's Dense, batch normalization, ReLU blocks at batch 128).
  They run on the CPU in a process of its own: options this jaxlib refuses are reported as errors, and
  so are those that kill the process (an abort inside XLA), the others probed in a new one."""
  import sys
  from jaxlab.training import kernels
  argv = [sys.executable, "-m", "jaxlab.perf.profiling",
          json.dumps({"options": options, "dtypes": list(dtypes), "steps": steps})]
  done, crashed = kernels.isolated(argv, kernels.measuring_environment(), timeout=3600)
  for item, why in crashed.items():
    log(f"{item}: {why}")
  rows = []
  for dtype in dtypes:
    for op in PROBE_OPS:
      for name in options:
        item = f"{dtype}/{op}/{name}"
        rows.append(done.get(item) or {"dtype": dtype, "op": op, "kernels": name,
                                       "error": crashed.get(item, "not probed")})
  return rows


def _probe(options: dict[str, dict[str, Any]], dtypes: list[str], steps: int,
           skip: str = "[]") -> None:
  """`probe_kernels`' measuring process: reports each row (`kernels.Reporter`)."""
  from jaxlab.training import kernels
  report = kernels.Reporter(skip)
  keys = jax.random.split(jax.random.PRNGKey(0), 2)
  conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  conv_flops = 2 * 16 * 28 * 28 * 256 * 5 * 5 * 96
  loss, params, x, labels = kernels.workload()["dense"]
  mlp_flops = 3 * 2 * x.shape[0] * sum(w.shape[0] * w.shape[1] for w in params.values())
  ops = {"matmul": (lambda a, b: a @ b, ((2048, 2048), (2048, 2048)), 2 * 2048 ** 3),
         "conv": (conv, ((16, 28, 28, 96), (5, 5, 96, 256)), conv_flops),
         "conv_backward": (jax.grad(lambda x, w: jnp.sum(conv(x, w).astype(jnp.float32) ** 2),
                                    argnums=(0, 1)),
                           ((16, 28, 28, 96), (5, 5, 96, 256)), 2 * conv_flops),
         "mlp_backward": (jax.grad(loss), None, mlp_flops)}
  assert tuple(ops) == PROBE_OPS
  for dtype in dtypes:
    for op, (fn, shapes, flops) in ops.items():
      if shapes is None:
        args = [{k: jnp.asarray(v, dtype) for k, v in params.items()}, jnp.asarray(x, dtype),
                jnp.asarray(labels)]
      else:
        args = [jax.random.normal(k, s, jnp.dtype(dtype)) for k, s in zip(keys, shapes)]
      for name, compiler_options in options.items():
        item = f"{dtype}/{op}/{name}"
        if item in report.skip:
          continue
        row = {"dtype": dtype, "op": op, "kernels": name}
        report.trying(item)
        try:
          compiled = jax.jit(fn, compiler_options=compiler_options or None).lower(
              *args).compile()
          row["library"] = library_of(compiled.as_text())
          row["gflops"] = flops / median_seconds(lambda: compiled(*args), steps) / 1e9
        except Exception as e:  # noqa: BLE001
          row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
        report.result(item, row)


if __name__ == "__main__":
  import sys
  _probe(**json.loads(sys.argv[1]), skip=(sys.argv[2:3] or ["[]"])[0])


# ----------------------------------------------------------------------------- an experiment


def profile(config: Any, steps: int, trace_dir: str | None = None,
            hlo_dir: str | None = None, checkpoint_dir: str | None = None,
            members: int = 1) -> dict:
  """Compiles and times `config`'s train and eval steps (a `jaxlab.config.TrainConfig`) on
  random data of its data set's shape; with `members` K > 1, the steps of K members as one
  vmapped group (each its own batch). Optionally writes a trace (`trace_dir`) and the optimized
  HLO (`hlo_dir`), and measures what saving the state costs (`checkpoint_dir`)."""
  import numpy as np

  from jaxlab.training import process
  from jaxlab.data import DATASETS
  from jaxlab.models import describe_precision, op_precisions
  from jaxlab.training.state import create_group_state, create_train_state, setup
  from jaxlab.training.steps import make_steps
  from jaxlab.inspection.summary import forward_flops

  experiment, batch_size, precision = config.experiment, config.batch_size, config.precision
  info = DATASETS.get(config.dataset)
  built = setup(config, info)
  model = built.model
  compiled_steps = make_steps(built)
  rng = np.random.default_rng(0)
  lead = (members,) if members > 1 else ()
  images = jax.device_put(rng.integers(0, 256, lead + (batch_size,) + info.image_shape,
                                       np.uint8))
  labels = jax.device_put(rng.integers(0, info.num_classes, lead + (batch_size,), np.uint8))
  if members > 1:
    state = create_group_state(built, list(range(members)), [config.learning_rate] * members)
    train_step, eval_step = compiled_steps.group_train_step, compiled_steps.group_eval_step
    eval_images, eval_labels = images[0], labels[0]
  else:
    state = create_train_state(built, config.seed, config.learning_rate)
    train_step, eval_step = compiled_steps.train_step, compiled_steps.eval_step
    eval_images, eval_labels = images, labels
  model_flops = forward_flops(model, info.image_shape) * batch_size * members

  train, train_stats = compile_stats(train_step, state, images, labels)
  holder = [state]

  def run_train():
    holder[0], metrics = train(holder[0], images, labels)
    return metrics

  evaluate, eval_stats = compile_stats(eval_step, state.variables, eval_images, eval_labels)
  results = {}
  for name, stats, run, flops in (("train_step", train_stats, run_train, 3 * model_flops),
                                  ("eval_step", eval_stats,
                                   lambda: evaluate(holder[0].variables, eval_images,
                                                    eval_labels),
                                   model_flops)):
    seconds = median_seconds(run, steps)
    results[name] = {"compile_seconds": stats.compile_seconds, "xla_flops": stats.flops,
                     "model_flops": flops, "bytes_accessed": stats.bytes_accessed,
                     "argument_bytes": stats.argument_bytes, "output_bytes": stats.output_bytes,
                     "temp_bytes": stats.temp_bytes, "median_step_seconds": seconds}
    if hlo_dir:
      path = pathlib.Path(hlo_dir)
      path.mkdir(parents=True, exist_ok=True)
      (path / f"{experiment}.{name}.hlo.txt").write_text(stats.hlo_text)
  peaks = {p: matmul_peak_flops(p) for p in sorted(set(op_precisions(model).values()))}
  peak = model_peak_flops(model, info.image_shape, peaks)
  for r in results.values():
    # XLA's count misses work done in library calls (cuDNN convolutions on a GPU), so the
    # achieved rate uses the larger of XLA's count and the model's dot/convolution count.
    flops = max(r["xla_flops"], r["model_flops"])
    r["flops_per_second"] = flops / r["median_step_seconds"]
    r["fraction_of_peak"] = r["flops_per_second"] / peak
  extra = {}
  if trace_dir:
    write_trace(run_train, trace_dir)
    events = device_events(trace_dir)
    extra = {"trace_top_ops": top_ops(events),
             "trace_breakdown": op_breakdown(events, train_stats.hlo_text)}
  if checkpoint_dir:
    extra["checkpoint"] = checkpoint_cost(holder[0], checkpoint_dir)
  for r in results.values():
    r["median_member_step_seconds"] = r["median_step_seconds"] / members
  return {"experiment": experiment, "dataset": info.name, "batch_size": batch_size,
          "members": members,
          "precision": precision, "computes": describe_precision(model),
          **process.environment(), "matmul_peaks_flops_per_second": peaks,
          "matmul_peak_flops_per_second": peak, **results,
          **extra}


def format_table(r: dict) -> str:
  """`profile`'s result as the table scripts/profile_step.py prints."""
  steps = ("train_step", "eval_step")
  lines = [f"{r['experiment']} on {r['dataset']}, batch {r['batch_size']}, {r['precision']}, "
           + (f"{r['members']} members (one vmapped group; FLOPs and times are of all), "
              if r["members"] > 1 else "") +
           f"{r['backend']} ({r['device']})"
           + (f", kernels {r['kernels']}" if "kernels" in r else "")
           + "; measured matmul peak " + ", ".join(
               f"{p} {v / 1e12:.3f}" for p, v in r["matmul_peaks_flops_per_second"].items())
           + " TFLOP/s" + (f" (this model's mix of them: "
                           f"{r['matmul_peak_flops_per_second'] / 1e12:.3f})"
                           if len(r["matmul_peaks_flops_per_second"]) > 1 else ""),
           f"computes in {r['computes']}"]
  rows = [("", *steps)] + [
      (label, *(fmt(r[s][key]) for s in steps)) for label, key, fmt in (
          ("compile (s)", "compile_seconds", lambda v: f"{v:.2f}"),
          ("XLA GFLOP", "xla_flops", lambda v: f"{v / 1e9:.3f}"),
          ("model GFLOP", "model_flops", lambda v: f"{v / 1e9:.3f}"),
          ("bytes accessed (MB)", "bytes_accessed", lambda v: f"{v / 1e6:.1f}"),
          ("argument bytes (MB)", "argument_bytes", lambda v: f"{v / 1e6:.1f}"),
          ("output bytes (MB)", "output_bytes", lambda v: f"{v / 1e6:.1f}"),
          ("temp bytes (MB)", "temp_bytes", lambda v: f"{v / 1e6:.1f}"),
          ("median step (ms)", "median_step_seconds", lambda v: f"{v * 1e3:.3f}"),
          ("per member (ms)", "median_member_step_seconds", lambda v: f"{v * 1e3:.3f}"),
          ("TFLOP/s", "flops_per_second", lambda v: f"{v / 1e12:.3f}"),
          ("fraction of peak", "fraction_of_peak", lambda v: f"{v:.1%}"))]
  lines += [f"{a:<22}{b:>14}{c:>14}" for a, b, c in rows]
  if r.get("checkpoint"):
    c = r["checkpoint"]
    lines.append(f"saving the train state ({c['bytes'] / 1e6:.1f} MB, median of {c['repeats']}): "
                 f"the loop waits {c['sync_seconds']:.3f} s writing synchronously, "
                 f"{c['async_blocking_seconds']:.3f} s with the background writer (which then "
                 f"writes for {c['async_background_seconds']:.3f} s while training goes on; as "
                 f"many bytes alone, fsynced: {c['bytes_alone_seconds']:.3f} s, "
                 f"{c['async_background_seconds'] / c['bytes_alone_seconds']:.1f}x)")
  if r.get("trace_breakdown"):
    b = r["trace_breakdown"]
    lines.append(f"traced device time of 5 train steps: {b['matmul_fraction']:.1%} in matrix "
                 f"multiplies and convolutions ({b['matmul_microseconds'] / 1e3:.3f} ms), "
                 f"{b['other_microseconds'] / 1e3:.3f} ms in the rest")
  if r.get("trace_top_ops"):
    lines.append("costliest operations in the trace of 5 train steps:")
    lines += [f"  {op['fraction']:6.1%} {op['microseconds'] / 1e3:9.3f} ms {op['calls']:5d}x  "
              f"{op['name'][:90]}" for op in r["trace_top_ops"]]
  return "\n".join(lines)
