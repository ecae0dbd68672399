"""The process a run trains in: its signals, its compilations, its environment.

(Its set-up from a script's flags, before JAX starts, is `jaxlab.cli.start`.)

Signals: a preempted machine sends SIGTERM and a user presses Ctrl-C; `stop_on_signals()` (used
by the scripts that train) turns the first such signal into a request that the training loop
honours at its next step boundary (`jaxlab.training.train`: a checkpoint, then
`Preempted`), or at once during an epoch's validation, whose state is saved before it starts
(`exits_at_once`); a second signal aborts at once. The flag is process-wide, as signals are.

Then what a process pays before it trains (XLA compilations, counted and timed as JAX reports
them, and the time to the first step), and the environment a run records in config.json.

Imports nothing of JAX until it is asked to: a script that refuses its input does so first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import shlex
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterator

import jaxlab
from jaxlab.errors import EXIT_PREEMPTED
from jaxlab.rundir import lock
from jaxlab.training import kernels

# ----------------------------------------------------------------------------- signals

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_requested = threading.Event()
# While the process's position is safe on disk (an epoch's validation, after the epoch's
# checkpoint): where it is, and what to wait for before exiting (`exits_at_once`).
_AT_ONCE: list[tuple[str, Callable[[], bool]]] = []


class Preempted(Exception):
  """Training stopped on a signal after saving its position."""

  def __init__(self, message: str):
    super().__init__(message)


def requested() -> bool:
  """Whether a stop was asked for (a signal arrived, or `request()` was called)."""
  return _requested.is_set()


def request() -> None:
  _requested.set()


def clear() -> None:
  _requested.clear()


def resume_hint() -> str:
  return f"resume with the same command: python3 {shlex.join(sys.argv)}"


@contextlib.contextmanager
def exits_at_once(where: str, written: Callable[[], bool]) -> Iterator[None]:
  """Within the block the process's position is saved (once `written()` returns True, after
  waiting for the writes in flight), so a signal under `stop_on_signals` ends the process at
  once, with status 75, instead of at the next step boundary: an epoch's validation can hold
  the main thread in one compiled call for many seconds. Only in a single process (several
  stop together, at an epoch's end)."""
  import jax
  single = jax.process_count() == 1
  if single:
    _AT_ONCE.append((where, written))
  try:
    yield
  finally:
    if single:
      _AT_ONCE.pop()


def _on_signal(signum: int) -> None:
  """What a SIGTERM or SIGINT does (in the watcher thread, the moment it arrives): the first asks
  for a stop, at the next step boundary, or at once where the position is saved
  (`exits_at_once`); a second aborts at once."""
  name = signal.Signals(signum).name
  if _requested.is_set():
    print(f"\n{name} again: aborting now, without a checkpoint.", file=sys.stderr, flush=True)
    os._exit(128 + signum)
  _requested.set()
  if _AT_ONCE:
    where, written = _AT_ONCE[-1]
    print(f"\n{name}: stopping now, {where.split(';')[0]}.", file=sys.stderr, flush=True)
    if written():  # Else the loop sees the error of the write, and the stop, as without this.
      print(f"stopped {where}\n{resume_hint()}", file=sys.stderr, flush=True)
      lock.release_all()  # A clean stop: the resumed run finds no stale holder.
      os._exit(EXIT_PREEMPTED)
    return
  print(f"\n{name}: stopping at the next step boundary after saving a checkpoint "
        f"({name} again aborts at once).", file=sys.stderr, flush=True)


def _watch(fd: int) -> None:
  """Reads the signal numbers the interpreter writes to `fd` as signals arrive (C level: even
  while the main thread is inside a compiled call), until `fd` closes."""
  while True:
    try:
      data = os.read(fd, 64)
    except OSError:
      return
    if not data:
      return
    for signum in data:
      _on_signal(signum)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
  """Within the block, SIGTERM and SIGINT ask the training loop to stop (see the module doc).
  They are seen the moment they arrive, by a thread of their own (`signal.set_wakeup_fd`),
  whatever the main thread is doing."""
  read, write = os.pipe()
  os.set_blocking(write, False)
  previous = {s: signal.signal(s, lambda signum, frame: None) for s in SIGNALS}
  previous_fd = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
  watcher = threading.Thread(target=_watch, args=(read,), name="jaxlab-signals", daemon=True)
  watcher.start()
  clear()
  try:
    yield
  finally:
    signal.set_wakeup_fd(previous_fd)
    for s, handler in previous.items():
      signal.signal(s, handler)
    os.close(write)
    watcher.join(timeout=5)
    os.close(read)


# ----------------------------------------------------------------------------- compilations


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

# JAX reports every program it gets for a backend (compiled, or loaded from the persistent
# cache) as one duration event; loads also come as cache hits, with their retrieval time.
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_RETRIEVAL_EVENT = "/jax/compilation_cache/cache_retrieval_time_sec"


@dataclasses.dataclass
class Totals:
  """The process's programs so far (or between two marks)."""

  programs: int = 0  # Compiled or loaded from the persistent cache.
  cache_hits: int = 0
  seconds: float = 0.0  # Compiling and loading.
  retrieval_seconds: float = 0.0  # Loading.

  @property
  def compilations(self) -> int:
    return self.programs - self.cache_hits

  @property
  def compile_seconds(self) -> float:
    return self.seconds - self.retrieval_seconds

  def __sub__(self, other: Totals) -> Totals:
    return Totals(*(getattr(self, f.name) - getattr(other, f.name)
                    for f in dataclasses.fields(self)))


_TOTALS = Totals()
_FIRST_STEP: list[float] = []  # Unix time the process's first train step was done.
_LISTENING: list[bool] = []


def _listen() -> None:
  """Registers the one pair of listeners of JAX's compile events (once per process)."""
  if _LISTENING:
    return
  import jax

  def duration(event: str, duration: float, **kwargs: Any) -> None:
    if event == _COMPILE_EVENT:
      _TOTALS.programs += 1
      _TOTALS.seconds += duration
    elif event == _RETRIEVAL_EVENT:
      _TOTALS.retrieval_seconds += duration

  def count(event: str, **kwargs: Any) -> None:
    if event == _CACHE_HIT_EVENT:
      _TOTALS.cache_hits += 1

  jax.monitoring.register_event_duration_secs_listener(duration)
  jax.monitoring.register_event_listener(count)
  _LISTENING.append(True)


def first_step_done() -> None:
  if not _FIRST_STEP:
    _FIRST_STEP.append(time.time())


@dataclasses.dataclass(frozen=True)
class Mark:
  """Where the counters stood at a moment (a run's start, a block being counted)."""

  time: float
  totals: Totals

  def since(self) -> Totals:
    """The programs compiled or loaded since this mark."""
    return _TOTALS - self.totals


def mark() -> Mark:
  _listen()
  return Mark(time.time(), dataclasses.replace(_TOTALS))


class CompileCounter:
  """Counts the XLA programs this process compiles (or loads from the persistent cache) while
  active, whoever asks for them: `with CompileCounter() as c: ...; c.count`."""

  def __enter__(self) -> CompileCounter:
    self._mark, self._final = mark(), None
    return self

  def __exit__(self, *exc: Any) -> None:
    self._final = self._mark.since()

  @property
  def count(self) -> int:
    return (self._final or self._mark.since()).programs


def startup_report(since: Mark) -> dict[str, Any]:
  """For metrics.json: the process's seconds from its start to its first train step, and, since
  `since` (a run's start), the XLA programs compiled (count, seconds) and those loaded from the
  persistent cache instead."""
  done = since.since()
  return {"process_seconds_to_first_step": (_FIRST_STEP[0] - PROCESS_START if _FIRST_STEP
                                            else None),
          "compilations": done.compilations, "compile_seconds": done.compile_seconds,
          "programs_from_cache": done.cache_hits}


def environment() -> dict[str, Any]:
  """jaxlab and JAX versions, the backend and device the computation runs on, and on the CPU
  the kernels XLA uses (`jaxlab.training.kernels`) with the XLA flags the backend started with."""
  import jax
  device = jax.devices()[0]
  found = {"jaxlab": jaxlab.__version__, "jax": jax.__version__,
           "backend": jax.default_backend(), "device": getattr(device, "device_kind", str(device)),
           "device_count": jax.device_count()}
  if found["backend"] == "cpu":
    found.update(kernels=kernels.applied(), xla_flags=os.environ.get("XLA_FLAGS", ""),
                 cpu=kernels.cpu()[0], cores=len(os.sched_getaffinity(0)))
  return found
