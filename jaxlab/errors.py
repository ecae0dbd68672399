"""The errors a user reads, and which of them are the user's to fix.

Imports nothing: scripts that never train, such as the report, handle them without JAX.
"""

from __future__ import annotations


class CheckpointError(Exception):
  """A checkpoint that is missing, damaged, of another run, or does not fit the model."""


class CorruptCheckpoint(CheckpointError):
  """A checkpoint whose bytes are not what was written: truncated, bit-flipped, not msgpack."""


class NonFiniteError(Exception):
  """A NaN or infinite loss or gradient under nan_policy=stop."""


class DataError(Exception):
  """Data that is missing, or that is present but not what it claims to be."""


# Errors a user causes with a flag or a file (or the machine, with a full disk): shown as one
# line, not as a traceback.
USER_ERRORS = (LookupError, ValueError, DataError, CheckpointError, OSError, ImportError,
               MemoryError)


def one_line(error: BaseException) -> str:
  """An error's message on one line (a LookupError's without the quotes KeyError adds)."""
  message = error.args[0] if isinstance(error, LookupError) and error.args else error
  return " ".join(str(message).split())


def describe(error: BaseException) -> str:
  """One line for a record (lab.json): a user error's message, any other error's type too."""
  text = one_line(error) or type(error).__name__
  return text if isinstance(error, USER_ERRORS) else f"{type(error).__name__}: {text}"
