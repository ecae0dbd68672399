"""Shared pieces of the absl entry points in scripts/: common flags and clean error exits."""

from __future__ import annotations

import functools
import logging as std_logging
import sys
from typing import Callable

from absl import flags

from jaxlab.checkpoint import CheckpointError
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


def define_experiment_flags() -> None:
  """--experiment and --dataset, shared by every script that builds a model."""
  flags.DEFINE_string("experiment", None, "Experiment name from the catalog (see README).")
  flags.DEFINE_string("dataset", None, "Data set: mnist, fashion_mnist or cifar10. "
                      "Default: the experiment's own.")
  flags.mark_flag_as_required("experiment")
