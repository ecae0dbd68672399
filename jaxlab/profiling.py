"""Profiling compiled steps: compile time, XLA cost and memory analysis, timed steps, peak FLOP/s.

Everything here works on whatever backend JAX picked (CUDA GPU or CPU). Timings synchronize with
`block_until_ready` on the outputs; each figure is the median over many runs after a warm-up.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp


class CompileCounter:
  """Counts XLA backend compilations while active (a context manager).

  Uses JAX's monitoring events, so it sees every compilation in the process, whoever asks.
  """

  EVENT = "/jax/core/compile/backend_compile_duration"

  def __init__(self):
    self.count = 0
    self._active = False
    jax.monitoring.register_event_duration_secs_listener(self._listener)

  def _listener(self, event: str, duration: float, **kwargs) -> None:
    if self._active and event == self.EVENT:
      self.count += 1

  def __enter__(self) -> "CompileCounter":
    self.count = 0
    self._active = True
    return self

  def __exit__(self, *exc) -> None:
    self._active = False


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


def matmul_peak_flops(dtype=jnp.float32, size: int | None = None, steps: int = 10) -> float:
  """The machine's measured matrix-multiply rate (FLOP/s) for `dtype`, from square products."""
  if size is None:
    size = 8192 if jax.default_backend() == "gpu" else 2048
  keys = jax.random.split(jax.random.PRNGKey(0), 2)
  a = jax.random.normal(keys[0], (size, size), dtype)
  b = jax.random.normal(keys[1], (size, size), dtype)
  matmul = jax.jit(lambda a, b: a @ b)
  seconds = median_seconds(lambda: matmul(a, b), steps)
  return 2.0 * size ** 3 / seconds


def write_trace(run: Callable[[], Any], trace_dir: str | pathlib.Path, steps: int = 5) -> None:
  """Records a `jax.profiler` trace of `steps` calls (opens in TensorBoard or Perfetto)."""
  jax.block_until_ready(run())
  with jax.profiler.trace(str(trace_dir)):
    for i in range(steps):
      with jax.profiler.StepTraceAnnotation("step", step_num=i):
        jax.block_until_ready(run())


# Host-side wrappers in a trace: they contain the device work rather than being part of it.
_WRAPPERS = ("ThunkExecutor", "PjitFunction", "Execute", "$", "step", "ParseArguments",
             "Handle inputs", "CreateOutputs", "train", "TfrtCpu", "PjRt")


def top_ops(trace_dir: str | pathlib.Path, n: int = 15) -> list[dict[str, Any]]:
  """The `n` costliest operations of a `jax.profiler` trace, by total time.

  On a GPU these are the kernels on the device's streams; on the CPU, XLA's thunks (fusions,
  dots, convolutions). Host-side wrappers (dispatch, Python frames) are left out.
  """
  import collections
  import gzip

  files = sorted(pathlib.Path(trace_dir).rglob("*.trace.json.gz"))
  if not files:
    raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir}")
  events = json.load(gzip.open(files[-1]))["traceEvents"]
  processes = {e["pid"]: e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "process_name"}
  device_pids = {pid for pid, name in processes.items() if "/device:" in name}
  total: collections.Counter = collections.Counter()
  calls: collections.Counter = collections.Counter()
  for e in events:
    if e.get("ph") != "X":
      continue
    if device_pids:
      if e["pid"] not in device_pids:
        continue
    elif e["name"].startswith(_WRAPPERS):
      continue
    total[e["name"]] += e.get("dur", 0)
    calls[e["name"]] += 1
  grand = sum(total.values()) or 1
  return [{"name": name, "microseconds": us, "calls": calls[name], "fraction": us / grand}
          for name, us in total.most_common(n)]
