"""Profiling compiled steps: compile time, XLA cost and memory analysis, timed steps, peak FLOP/s.

Everything here works on whatever backend JAX picked (CUDA GPU or CPU). Timings synchronize with
`block_until_ready` on the outputs; each figure is the median over many runs after a warm-up.
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


def model_peak_flops(model: Any, peaks: dict[str, float]) -> float:
  """The rate (FLOP/s) at which `model`'s Dense and Conv2D FLOPs could run if each ran at the
  measured matmul peak of the precision it computes in (`peaks`: "float32", "bf16"): under bf16
  on a CPU, dots in bfloat16 and convolutions in float32 (jaxlab.models.PRECISIONS)."""
  from jaxlab.models import op_precisions
  from jaxlab.summary import forward_flops_by_kind
  flops, precisions = forward_flops_by_kind(model), op_precisions(model)
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
  """What saving `state` costs the training loop, synchronously and in the background.

  Synchronous: the loop waits for the host copy, serialization and the fsynced write.
  Background (`checkpoint.AsyncWriter`, as the Checkpoints hook saves): the loop waits for the
  host copy and the hand-over only; the write's own time is measured too. Medians of
  `repeats` saves of the same state to `directory`."""
  from jaxlab import checkpoint

  directory = pathlib.Path(directory)
  target = checkpoint.checkpoint_template(state)
  sync_writer, async_writer = checkpoint.AsyncWriter(background=False), checkpoint.AsyncWriter()
  sync, blocked, background = [], [], []
  try:
    for i in range(repeats):
      t0 = time.perf_counter()
      sync_writer.save([directory / f"sync_{i}.msgpack"], checkpoint.to_host(target), {})
      sync.append(time.perf_counter() - t0)
      t0 = time.perf_counter()
      async_writer.save([directory / f"async_{i}.msgpack"], checkpoint.to_host(target), {})
      t1 = time.perf_counter()
      async_writer.wait()
      blocked.append(t1 - t0)
      background.append(time.perf_counter() - t1)
  finally:
    async_writer.close()
  return {"bytes": (directory / "sync_0.msgpack").stat().st_size, "repeats": repeats,
          "sync_seconds": statistics.median(sync),
          "async_blocking_seconds": statistics.median(blocked),
          "async_background_seconds": statistics.median(background)}


# XLA:CPU's other oneDNN options, probed beside jaxlab.perf.kernels' candidates (onednn_dot among
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
  `jaxlab.perf.kernels`' dense step: Lab 02's Dense, batch normalization, ReLU blocks at batch 128).
  They run on the CPU in a process of its own: options this jaxlib refuses are reported as errors, and
  so are those that kill the process (an abort inside XLA), the others probed in a new one."""
  import sys
  from jaxlab.perf import kernels
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
  from jaxlab.perf import kernels
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
