"""Shared pieces of the absl entry points in scripts/: common flags and clean error exits.

Exit statuses of every script: 0 success; 1 the work ran but did not all succeed (a lab with a
failed run, layers that diverge), or a bug (with its traceback); 2 bad input (a
`jaxlab.errors.UserError`: a flag, a file, a full disk: one line `error: ...`; with
JAXLAB_TRACEBACK=1 its traceback too); 3 a NaN or infinite loss stopped training; 75 stopped
by SIGTERM or SIGINT after saving a checkpoint (the same command resumes).
"""

from __future__ import annotations

import dataclasses
import functools
import logging as std_logging
import sys
import traceback
import types
import typing
from typing import Any, Callable, Iterable

from absl import app, flags

from jaxlab.config import TrainConfig
from jaxlab.errors import BadValue, NonFiniteError, UserError, one_line, output, show_traceback
from jaxlab.files import write_atomic
from jaxlab.runtime import EXIT_PREEMPTED, Preempted, resume_hint

# JAX logs at INFO that it found no TPU library on every start; that is not news to a user.
std_logging.getLogger("jax._src.xla_bridge").setLevel(std_logging.WARNING)

EXIT_BAD_INPUT = 2
EXIT_NONFINITE = 3


def user_errors_exit(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
  """Wraps an absl `main` so that a user error (stray positional arguments among them) prints
  `error: ...` and exits with status 2, a NaN stop with 3, and a stop on a signal prints where
  it stopped and how to resume, and exits with 75. Any other exception is a bug and keeps its
  traceback (status 1). The process's set-up is the script's own first call
  (`jaxlab.runtime.start`)."""

  @functools.wraps(main)
  def wrapped(argv: list[str]) -> None:
    try:
      if len(argv) > 1:
        raise BadValue(f"unexpected arguments: {' '.join(argv[1:])}")
      main(argv)
    except Preempted as e:
      print(f"{e}\n{resume_hint()}", file=sys.stderr)
      sys.exit(EXIT_PREEMPTED)
    except NonFiniteError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(EXIT_NONFINITE)
    except UserError as e:  # Anything else is a bug: its traceback, and status 1.
      if show_traceback():
        traceback.print_exc()
      print(f"error: {one_line(e)}", file=sys.stderr)
      sys.exit(EXIT_BAD_INPUT)

  return wrapped


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, but a bad flag is one `error:` line and status 2, as other bad input."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"error: {one_line(e)} (see --help)", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


def define_compilation_cache_flag() -> None:
  flags.DEFINE_bool("compilation_cache", True, "Keep compiled XLA programs in JAX's persistent "
                    "cache ($JAXLAB_XLA_CACHE_DIR, or $JAXLAB_CACHE_DIR/xla; default "
                    "~/.cache/jaxlab/xla), so another process running the same architecture does "
                    "not compile it again.")


def define_kernels_flag() -> None:
  from jaxlab.perf.kernels import CHOICES  # No JAX.
  flags.DEFINE_enum("kernels", None, list(CHOICES),
                    "XLA:CPU's kernel library for dots and convolutions (jaxlab.perf.kernels): auto "
                    "(the fastest on this machine for the kind of model run, with or without "
                    "convolutions, whose results equal XLA's own within float rounding, measured "
                    "once and cached in $JAXLAB_CACHE_DIR/kernels.json), xla (as XLA comes), or "
                    "one by name: onednn_dot gives dots to oneDNN (bfloat16 on CPUs with "
                    "AVX512-BF16 or AMX), but with jaxlib 0.10.2 aborts on some models and "
                    "keeps nothing in the compilation cache (scripts/probe_kernels.py shows "
                    "what each does here). Default: $JAXLAB_KERNELS, else auto; a resumed run "
                    "keeps the kernels it started with.")


def define_loop_flag() -> None:
  flags.DEFINE_enum("loop", None, ["auto", "scan", "steps"], "How a compiled call of "
                    "--steps_per_dispatch train steps runs: scan (one lax.scan), steps (one "
                    "dispatch of the compiled step each: XLA:CPU runs a convolution inside a "
                    "scan many times slower) or auto (steps for a model with convolutions on "
                    "the CPU, scan otherwise). Default: auto; a resumed run keeps the loop it "
                    "started with (config.json's environment).")


def define_distributed_flags() -> None:
  """--coordinator_address, --num_processes, --process_id: a run over several processes
  (jax.distributed.initialize); without them, a launcher's environment (SLURM, Open MPI,
  Kubernetes) is detected."""
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for a run of "
                      "several processes (with --num_processes and --process_id).")
  flags.DEFINE_integer("num_processes", None, "Processes of a multi-process run.")
  flags.DEFINE_integer("process_id", None, "This process's index, 0 to --num_processes - 1.")


def parse_list(values: list[str] | None, kind: type, name: str) -> list:
  """A comma-separated flag's values as `kind` (int, float), naming the flag if one is not."""
  try:
    return [kind(v) for v in values or []]
  except ValueError:
    words = {int: "integers", float: "numbers"}.get(kind, kind.__name__)
    raise BadValue(f"--{name} must be {words} separated by commas, got "
                   f"{','.join(values)!r}") from None


def write_outputs(*files: tuple[str | None, str]) -> None:
  """Writes each (path, text) whose path was given (a flag's value: a file the user named,
  its folders made), atomically; one that cannot be written is the user's error."""
  for path, text in files:
    if path:
      with output(path):
        write_atomic(path, text.encode())


def run(main: Callable[[list[str]], None]) -> None:
  """`absl.app.run` with jaxlab's handling of bad flags (see `_parse_flags`)."""
  app.run(main, flags_parser=_parse_flags)


_DEFINE = {int: flags.DEFINE_integer, float: flags.DEFINE_float, str: flags.DEFINE_string,
           bool: flags.DEFINE_bool}


def _flag_type(annotation: Any) -> type:
  """int for `int` and `int | None`, and so on."""
  if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
    (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
  return annotation


def define_config_flags(names: Iterable[str] | None = None,
                        exclude: Iterable[str] = ()) -> tuple[str, ...]:
  """One flag per `TrainConfig` field (all but `experiment`, or `names`), with the field's type
  and help text, defaulting to None: "not given, keep the experiment's default". The settings
  are declared once, in TrainConfig; every script that overrides them shares these flags.
  Returns the flags' names, for `config_overrides`."""
  hints = typing.get_type_hints(TrainConfig)
  fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
  names = tuple(n for n in (names or [n for n in fields if n != "experiment"])
                if n not in set(exclude))
  for name in names:
    _DEFINE[_flag_type(hints[name])](name, None, fields[name].metadata["help"])
  return names


def config_overrides(names: Iterable[str]) -> dict[str, Any]:
  """The values of the config flags `names` (None where not given), for `resolve_config`."""
  return {name: flags.FLAGS[name].value for name in names}


LAB_HELP = ("A built-in lab (lab02, lab04_alexnet, lab04_vgg) or the path of a lab file "
            "(path/to/my_lab.py), loaded first: the experiments, data sets and optimizers it "
            "declares are then known by name.")


def define_lab_flag(required: bool = False) -> None:
  """--lab, one definition for every script that takes one (`load_lab`)."""
  flags.DEFINE_string("lab", None, LAB_HELP)
  if required:
    flags.mark_flag_as_required("lab")


def load_lab() -> Any:
  """The lab --lab names (`jaxlab.experiment.load_lab`), or None where it names none."""
  if not flags.FLAGS.lab:
    return None
  from jaxlab.experiment import load_lab as load  # JAX: only once the flags are checked.
  return load(flags.FLAGS.lab)


def define_experiment_flag() -> None:
  """--experiment, required."""
  help_text = next(f for f in dataclasses.fields(TrainConfig) if f.name == "experiment")
  flags.DEFINE_string("experiment", None, help_text.metadata["help"])
  flags.mark_flag_as_required("experiment")


def define_experiment_flags() -> None:
  """--experiment, --lab and --dataset, shared by every script that builds a model."""
  define_experiment_flag()
  define_lab_flag()
  define_config_flags(["dataset"])
