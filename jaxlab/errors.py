"""The errors jaxlab raises for a user to read (imports nothing: scripts that never train, such
as the report, handle them without importing JAX)."""


class CheckpointError(Exception):
  """A checkpoint that is missing, damaged, of another run, or does not fit the model."""


class CorruptCheckpoint(CheckpointError):
  """A checkpoint whose bytes are not what was written: truncated, bit-flipped, not msgpack."""


class NonFiniteError(Exception):
  """A NaN or infinite loss or gradient under nan_policy=stop."""
