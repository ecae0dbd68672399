"""The errors a user reads: the `UserError`s jaxlab decided are the user's, and bugs (the rest).

A `UserError` is raised where jaxlab checks its input and finds it wrong, and it names the bad
value: a flag or setting (`BadValue`), an unknown name (`UnknownNameError`), a file or directory
the user named that is missing (`MissingFile`) or not what it claims (`DataError`,
`CheckpointError`), a lab file that fails to load (`LabFileError`), a full disk (`DiskFull`),
more members than fit in memory (`OutOfMemory`), an optional package that is not installed
(`MissingDependency`). The scripts show one as one `error:` line and exit with status 2
(`jaxlab.cli`). Any other exception is a bug, in jaxlab or below it: it keeps its traceback and
the process exits with status 1. `JAXLAB_TRACEBACK=1` shows a user error's traceback too.

Each user error also derives from the built-in type a caller would catch for it (ValueError,
LookupError, FileNotFoundError, OSError, ImportError, MemoryError).

Imports nothing: scripts that never train, such as the report, handle them without JAX.
"""

from __future__ import annotations

import contextlib
import errno
import os
from typing import Iterator

TRACEBACK_ENV = "JAXLAB_TRACEBACK"  # Set (to anything but 0 or empty): show a user error's too.

# The exit statuses of every script (1: the work ran but did not all succeed, or a bug).
EXIT_BAD_INPUT = 2  # A UserError: one `error:` line.
EXIT_NONFINITE = 3  # A NaN or infinite loss stopped training.
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on request; the same command resumes.


class UserError(Exception):
  """Input that jaxlab checked and found wrong; the message names the bad value."""


class BadValue(UserError, ValueError):
  """A flag, setting or declaration with a value jaxlab cannot use."""


class UnknownNameError(UserError, LookupError):
  """A name that is not in a registry (experiment, lab, data set, ...); the message lists the
  known names."""

  def __str__(self) -> str:  # LookupError's str() is KeyError's, with quotes; not this one's.
    return str(self.args[0]) if self.args else ""


class MissingFile(UserError, FileNotFoundError):
  """A file or directory the user named (or that a run directory names) does not exist."""


class LabFileError(BadValue):
  """A lab file that fails to load: a syntax error, an exception in its top-level code, or no
  experiments declared."""


class DataError(UserError):
  """Data that is missing, or that is present but not what it claims to be."""


class CheckpointError(UserError):
  """A checkpoint that is missing, damaged, of another run, does not fit the model, or could
  not be written."""


class CorruptCheckpoint(CheckpointError):
  """A checkpoint whose bytes are not what was written: truncated, bit-flipped, not msgpack."""


class DiskFull(UserError, OSError):
  """A write that failed for want of space (or over a file-size or quota limit)."""


class OutOfMemory(UserError, MemoryError):
  """More than fits in the device's memory: fewer members at once would."""


class MissingDependency(UserError, ImportError):
  """An optional package (Keras, h5py, PyTorch) that this command needs is not installed."""


class NonFiniteError(Exception):
  """A NaN or infinite loss or gradient under nan_policy=stop (status 3, not a user error)."""


# The errnos of a write that failed for want of space: a full disk, a quota, a file-size limit.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
  """Within the block, a write that runs out of space raises `DiskFull` naming `path`; any
  other OSError passes as it is."""
  try:
    yield
  except OSError as e:
    if e.errno not in NO_SPACE:
      raise
    full = DiskFull(f"could not write {path}: {e.strerror or e}")
    full.errno = e.errno
    raise full from e


@contextlib.contextmanager
def output(path: str | os.PathLike, flag: str = "") -> Iterator[None]:
  """Within the block, an OSError while creating or writing `path`, a file or directory the
  user named (with the flag `flag`), is theirs to fix: `DiskFull` where it ran out of space
  (`writing`), else a `BadValue` naming the path. Keep the block to the writes themselves."""
  named = f"{flag} {path}" if flag else str(path)
  try:
    with writing(named):
      yield
  except UserError:
    raise
  except OSError as e:
    raise BadValue(f"{named} cannot be written: {e.strerror or e}") from e


def one_line(error: BaseException) -> str:
  """An error's message on one line."""
  return " ".join(str(error).split())


def describe(error: BaseException) -> str:
  """One line for a record (lab.json): a user error's message; a bug's type and message."""
  text = one_line(error) or type(error).__name__
  return text if isinstance(error, UserError) else f"{type(error).__name__}: {text}"


def show_traceback() -> bool:
  """Whether $JAXLAB_TRACEBACK asks for the traceback of a user error."""
  return os.environ.get(TRACEBACK_ENV, "") not in ("", "0")
