"""The process a run trains in: compilations, the persistent cache, its environment.

What a process pays before it trains (XLA compilations, counted and timed as JAX reports them,
and the time to the first step), JAX's persistent compilation cache (which makes a second
process running the same programs skip compiling them), and the environment a run records in
config.json.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import time
from typing import Any

import jax

import jaxlab
from jaxlab import kernels
from jaxlab.data import compilation_cache_options

# JAX reports every program it gets for a backend (compiled, or loaded from the persistent
# cache) as one duration event; loads also come as cache hits, with their retrieval time.
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_RETRIEVAL_EVENT = "/jax/compilation_cache/cache_retrieval_time_sec"


def _process_start() -> float:
  """The Unix time this process started (Linux: /proc; elsewhere: when jaxlab was imported)."""
  try:
    ticks = int(pathlib.Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    boot = next(int(line.split()[1]) for line in pathlib.Path("/proc/stat").read_text()
                .splitlines() if line.startswith("btime"))
    return boot + ticks / os.sysconf("SC_CLK_TCK")
  except (OSError, ValueError, IndexError, StopIteration):
    return time.time()


PROCESS_START = _process_start()


@dataclasses.dataclass
class _Totals:
  programs: int = 0  # Compiled or loaded from the persistent cache.
  cache_hits: int = 0
  seconds: float = 0.0  # Compiling and loading.
  retrieval_seconds: float = 0.0  # Loading.
  first_step: float | None = None  # Unix time the process's first train step was done.

  @property
  def compilations(self) -> int:
    return self.programs - self.cache_hits

  @property
  def compile_seconds(self) -> float:
    return self.seconds - self.retrieval_seconds


_TOTALS = _Totals()


def _duration_listener(event: str, duration: float, **kwargs: Any) -> None:
  if event == _COMPILE_EVENT:
    _TOTALS.programs += 1
    _TOTALS.seconds += duration
  elif event == _RETRIEVAL_EVENT:
    _TOTALS.retrieval_seconds += duration


def _event_listener(event: str, **kwargs: Any) -> None:
  if event == _CACHE_HIT_EVENT:
    _TOTALS.cache_hits += 1


jax.monitoring.register_event_duration_secs_listener(_duration_listener)
jax.monitoring.register_event_listener(_event_listener)


def first_step_done() -> None:
  if _TOTALS.first_step is None:
    _TOTALS.first_step = time.time()


@dataclasses.dataclass(frozen=True)
class Mark:
  """Where the counters stood when a run started."""

  time: float
  totals: _Totals


def mark() -> Mark:
  return Mark(time.time(), dataclasses.replace(_TOTALS))


def startup_report(since: Mark) -> dict[str, Any]:
  """For metrics.json: the process's seconds from its start to its first train step, and, since
  `since` (a run's start), the XLA programs compiled (count, seconds) and those loaded from the
  persistent cache instead."""
  first, now, then = _TOTALS.first_step, _TOTALS, since.totals
  return {"process_seconds_to_first_step": None if first is None else first - PROCESS_START,
          "compilations": now.compilations - then.compilations,
          "compile_seconds": now.compile_seconds - then.compile_seconds,
          "programs_from_cache": now.cache_hits - then.cache_hits}


def enable_compilation_cache(directory: str | os.PathLike | None = None) -> pathlib.Path:
  """Turns on JAX's persistent compilation cache in `directory` (default
  `jaxlab.data.default_compilation_cache()`), for every program however quick to compile: a second process
  (another seed, another learning rate, a resumed run) then loads them instead of compiling
  them."""
  options = compilation_cache_options(directory)
  for name, value in options.items():
    jax.config.update(name, value)
  return pathlib.Path(options["jax_compilation_cache_dir"])


def environment() -> dict[str, Any]:
  """jaxlab and JAX versions, the backend and device the computation runs on, and on the CPU
  the kernels XLA uses (`jaxlab.kernels`) with the XLA flags the backend started with."""
  device = jax.devices()[0]
  found = {"jaxlab": jaxlab.__version__, "jax": jax.__version__,
           "backend": jax.default_backend(), "device": getattr(device, "device_kind", str(device)),
           "device_count": jax.device_count()}
  if found["backend"] == "cpu":
    found.update(kernels=kernels.applied(), xla_flags=os.environ.get("XLA_FLAGS", ""),
                 cpu=kernels.cpu()[0], cores=len(os.sched_getaffinity(0)))
  return found
