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
import os
import pathlib
import sys
import traceback
import types
import typing
from typing import Any, Callable, Iterable

from absl import app, flags

from jaxlab import caches
from jaxlab.config import TrainConfig
from jaxlab.training import kernels
from jaxlab.errors import (EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_PREEMPTED, BadValue,
                           NonFiniteError, UserError, one_line, output, show_traceback)
from jaxlab.files import write_atomic
from jaxlab.training.process import Preempted, resume_hint

# JAX logs at INFO that it found no TPU library on every start; that is not news to a user.
std_logging.getLogger("jax._src.xla_bridge").setLevel(std_logging.WARNING)

# Environment variables by which JAX's cluster detection recognizes a launcher.
CLUSTER_ENVIRONMENT = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "JOBSET_NAME",
                       "MEGASCALE_COORDINATOR_ADDRESS")


def under_launcher() -> bool:
  """Whether a cluster launcher (SLURM, Open MPI, Kubernetes) started this process, as JAX's
  cluster detection sees it."""
  return any(name in os.environ for name in CLUSTER_ENVIRONMENT)


def start(flags: Any) -> None:
  """The first call of every script's `main`: sets up this process for its command line
  (`flags`, absl's FlagValues) before JAX starts its backend, from the flags the script
  defines (each only if it does):

  - `--kernels`: XLA:CPU's kernel libraries (`jaxlab.training.kernels`), for the kind of model the
    command runs (with or without convolutions), or the ones a resumed run started with;
  - `--coordinator_address`, `--num_processes`, `--process_id` (or a cluster launcher's
    environment): a run of several processes (`jax.distributed`);
  - `--compilation_cache`: JAX's persistent compilation cache (`jaxlab.caches`), which makes a
    second process running the same programs skip compiling them."""
  if "kernels" in flags:  # Before JAX starts its backend: XLA reads its flags once.
    kernels.apply(flags.kernels, _started_kernels(flags), kind=lambda: _model_kind(flags))
    if _precision(flags) == "bf16" and not kernels.gpu_possible():
      print(kernels.bf16_notice(_model_kind(flags, precision=False)), file=sys.stderr)
  if "coordinator_address" in flags:
    given = [flags[n].value for n in ("coordinator_address", "num_processes", "process_id")]
    if under_launcher() or any(v is not None for v in given):
      from jaxlab.training import parallel
      parallel.initialize(*given)
  if "compilation_cache" in flags and flags.compilation_cache:
    caches.enable_compilation_cache()


def _precision(flags: Any) -> str:
  return flags.precision if "precision" in flags and flags.precision else "float32"


def _model_kind(flags: Any, precision: bool = True) -> str:
  """The kind of model a command runs, for jaxlab.training.kernels: "conv" where one of the
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
  from jaxlab.rundir.run import CONFIG_FILE, runs_within
  # A run's own, or a group's, a lab's or a grid's first member's (DIR/M/, DIR/EXP/seed_S/).
  for run_dir in runs_within(workdir)[:1]:
    found = read_json(run_dir / CONFIG_FILE).get("environment", {})
    if isinstance(found, dict) and found.get("kernels"):
      return found["kernels"]
  return None


def user_errors_exit(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
  """Wraps an absl `main` so that a user error (stray positional arguments among them) prints
  `error: ...` and exits with status 2, a NaN stop with 3, and a stop on a signal prints where
  it stopped and how to resume, and exits with 75. Any other exception is a bug and keeps its
  traceback (status 1). The process's set-up is the script's own first call
  (`start`)."""

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
  from jaxlab.training.kernels import CHOICES  # No JAX.
  flags.DEFINE_enum("kernels", None, list(CHOICES),
                    "XLA:CPU's kernel library for dots and convolutions (jaxlab.training.kernels): auto "
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


def flag_reference(scripts: Iterable[str | os.PathLike]) -> str:
  """The Markdown reference of every flag of `scripts` (paths of absl scripts), from the flags
  themselves: each script is loaded (not run), and what it defines is listed under its name
  with its default and help. `scripts/flag_reference.py` writes it to docs/guide/flags.md."""
  import runpy

  lines = ["# Flags", "",
           "Every flag of every script, as the scripts define them (`python3 scripts/NAME.py "
           "--help` says the same). Written by `python3 scripts/flag_reference.py`; a test "
           "fails when it is out of date.", ""]
  for script in scripts:
    script = pathlib.Path(script)
    before = set(flags.FLAGS)
    module = runpy.run_path(str(script), run_name=f"jaxlab_flag_reference_{script.stem}")
    try:
      added = sorted(set(flags.FLAGS) - before)
      if not added:
        continue
      doc = (module.get("__doc__") or "").strip().split("\n\n")[0].replace("\n", " ")
      lines += [f"## `scripts/{script.name}`", "", doc, ""]
      for name in added:
        flag = flags.FLAGS[name]
        default = "" if flag.default is None else f" (default: `{flag.default_as_str.strip(chr(39))}`)"
        kind = f" one of {', '.join(f'`{v}`' for v in flag.parser.enum_values)}" if hasattr(
            flag.parser, "enum_values") else ""
        text = " ".join(flag.help.split())
        if kind and text.startswith("<"):  # absl starts an enum's help with its values.
          text = text.split(">: ", 1)[-1]
        lines.append(f"- `--{name}`{default}{kind}: {text}")
      lines.append("")
    finally:
      for name in set(flags.FLAGS) - before:
        delattr(flags.FLAGS, name)
  return "\n".join(lines)
