"""The process a run trains in: its set-up, its signals, its compilations, its environment.

`start(FLAGS)` is the first call of every script's `main`: it sets up the process before JAX
starts its backend, from the flags the script defines (each only if it does):

- `--kernels`: XLA:CPU's kernel libraries (`jaxlab.perf.kernels`), for the kind of model the command
  runs (with or without convolutions), or the ones a resumed run started with;
- `--coordinator_address`, `--num_processes`, `--process_id` (or a cluster launcher's
  environment): a run of several processes (`jax.distributed`);
- `--compilation_cache`: JAX's persistent compilation cache (`jaxlab.caches`), which makes a
  second process running the same programs skip compiling them.

Signals: a preempted machine sends SIGTERM and a user presses Ctrl-C; `stop_on_signals()` (used
by the scripts that train) turns the first such signal into a request that the training loop
honours at its next step boundary (`jaxlab.hooks.StopOnSignal`: a checkpoint, then
`Preempted`), or at once during an epoch's validation, whose state is saved before it starts
(`exits_at_once`); a second signal aborts at once. The flag is process-wide, as signals are.

Then what a process pays before it trains (XLA compilations, counted and timed as JAX reports
them, and the time to the first step), and the environment a run records in config.json.

Imports nothing of JAX until it is asked to: `start` runs before JAX does.
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
from jaxlab import caches
from jaxlab.perf import kernels

# Environment variables by which JAX's cluster detection recognizes a launcher.
CLUSTER_ENVIRONMENT = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "JOBSET_NAME",
                       "MEGASCALE_COORDINATOR_ADDRESS")


def under_launcher() -> bool:
  """Whether a cluster launcher (SLURM, Open MPI, Kubernetes) started this process, as JAX's
  cluster detection sees it."""
  return any(name in os.environ for name in CLUSTER_ENVIRONMENT)


def start(flags: Any) -> None:
  """Sets up this process for a script's command line (`flags`, absl's FlagValues; see the
  module docstring): kernels, then jax.distributed, then the compilation cache."""
  if "kernels" in flags:  # Before JAX starts its backend: XLA reads its flags once.
    kernels.apply(flags.kernels, _started_kernels(flags), kind=lambda: _model_kind(flags))
    if _precision(flags) == "bf16" and not kernels.gpu_possible():
      print(kernels.bf16_notice(_model_kind(flags, precision=False)), file=sys.stderr)
  if "coordinator_address" in flags:
    given = [flags[n].value for n in ("coordinator_address", "num_processes", "process_id")]
    if under_launcher() or any(v is not None for v in given):
      from jaxlab import parallel
      parallel.initialize(*given)
  if "compilation_cache" in flags and flags.compilation_cache:
    enable_compilation_cache()


def _precision(flags: Any) -> str:
  return flags.precision if "precision" in flags and flags.precision else "float32"


def _model_kind(flags: Any, precision: bool = True) -> str:
  """The kind of model a command runs, for jaxlab.perf.kernels: "conv" where one of the
  experiments it names (--experiment, else --lab's --experiments or all of its experiments)
  convolves (`jaxlab.models.convolves`: read from its jaxpr, on --dataset or its own data set),
  "dense" where none does, "conv" where it names none; "_bf16" added under --precision=bf16
  (unless `precision` is False). Imports the experiments and traces their models, which imports
  JAX but does not start its backend."""
  suffix = "_bf16" if precision and _precision(flags) == "bf16" else ""
  names = [flags.experiment] if "experiment" in flags and flags.experiment else []
  lab = flags.lab if "lab" in flags else None
  if not names and not lab:
    return "conv" + suffix
  from jaxlab import experiment
  from jaxlab.data import DATASETS
  from jaxlab.models import convolves
  if lab:
    declared = experiment.load_lab(lab).experiments
    names = names or (flags.experiments if "experiments" in flags and flags.experiments
                      else declared)
  dataset = flags.dataset if "dataset" in flags and flags.dataset else None

  def convolving(name: str) -> bool:
    info = DATASETS.get(dataset or experiment.get_experiment(name).dataset)
    return convolves(experiment.build_model(name, info), info.image_shape)

  return ("conv" if any(convolving(n) for n in names) else "dense") + suffix


def _started_kernels(flags: Any) -> str | None:
  """The kernels recorded in --workdir's config.json (or its first member's), if any."""
  workdir = flags["workdir"].value if "workdir" in flags else None
  if not workdir:
    return None
  from jaxlab.files import read_json
  root = pathlib.Path(workdir)
  # A run's own, or a group's, a lab's or a grid's first member's (DIR/M/, DIR/EXP/seed_S/).
  members = sorted(root.glob("*/config.json")) + sorted(root.glob("*/*/config.json"))
  for path in [root / "config.json", *members[:1]]:
    found = read_json(path).get("environment", {})
    if isinstance(found, dict) and found.get("kernels"):
      return found["kernels"]
  return None


def enable_compilation_cache(directory: str | os.PathLike | None = None) -> pathlib.Path:
  """Turns on JAX's persistent compilation cache in `directory` (default
  `jaxlab.caches.compilation_cache_dir()`), for every program however quick to compile: a
  second process (another seed, another learning rate, a resumed run) then loads them instead
  of compiling them. Before JAX is imported, through the environment it reads when it is (so
  that a script that refuses its input does so without importing JAX); after, through
  jax.config."""
  options = caches.compilation_cache_options(directory)
  if "jax" in sys.modules:
    import jax
    for name, value in options.items():
      jax.config.update(name, value)
  else:
    os.environ.update({name.upper(): str(value) for name, value in options.items()})
  return pathlib.Path(options["jax_compilation_cache_dir"])


# ----------------------------------------------------------------------------- signals

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on request; the same command resumes.
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
  return f"resume with the same command: python {shlex.join(sys.argv)}"


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
  the kernels XLA uses (`jaxlab.perf.kernels`) with the XLA flags the backend started with."""
  import jax
  device = jax.devices()[0]
  found = {"jaxlab": jaxlab.__version__, "jax": jax.__version__,
           "backend": jax.default_backend(), "device": getattr(device, "device_kind", str(device)),
           "device_count": jax.device_count()}
  if found["backend"] == "cpu":
    found.update(kernels=kernels.applied(), xla_flags=os.environ.get("XLA_FLAGS", ""),
                 cpu=kernels.cpu()[0], cores=len(os.sched_getaffinity(0)))
  return found
