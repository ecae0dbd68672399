"""Shared pieces of the absl entry points in scripts/: common flags and clean error exits."""

from __future__ import annotations

import dataclasses
import functools
import logging as std_logging
import sys
import types
import typing
from typing import Any, Callable, Iterable

from absl import flags

from jaxlab.checkpoint import CheckpointError
from jaxlab.config import TrainConfig
from jaxlab.data import DataError

# JAX logs at INFO that it found no TPU library on every start; that is not news to a user.
std_logging.getLogger("jax._src.xla_bridge").setLevel(std_logging.WARNING)

# Errors a user causes with a flag or a file: shown as one line, not as a traceback.
USER_ERRORS = (LookupError, ValueError, DataError, CheckpointError, FileNotFoundError,
               FileExistsError, ImportError)


def user_errors_exit(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
  """Wraps an absl `main` so that a user error (stray positional arguments among them) prints
  `error: ...` and exits with status 2."""

  @functools.wraps(main)
  def wrapped(argv: list[str]) -> None:
    try:
      if len(argv) > 1:
        raise ValueError(f"unexpected arguments: {' '.join(argv[1:])}")
      main(argv)
    except USER_ERRORS as e:
      message = e.args[0] if isinstance(e, LookupError) and e.args else e
      print(f"error: {message}", file=sys.stderr)
      sys.exit(2)

  return wrapped


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


def define_experiment_flag() -> None:
  """--experiment, required."""
  help_text = next(f for f in dataclasses.fields(TrainConfig) if f.name == "experiment")
  flags.DEFINE_string("experiment", None, help_text.metadata["help"])
  flags.mark_flag_as_required("experiment")


def define_experiment_flags() -> None:
  """--experiment and --dataset, shared by every script that builds a model."""
  define_experiment_flag()
  define_config_flags(["dataset"])
