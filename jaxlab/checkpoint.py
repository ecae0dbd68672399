"""msgpack checkpoints of the full train state (flax.serialization), written atomically."""

from __future__ import annotations

import os
import pathlib
from typing import Any, TypeVar

from flax import serialization

T = TypeVar("T")


class CheckpointError(Exception):
  """A checkpoint that is missing or does not fit the model it is restored into."""


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
  """Writes `data` to `path` so that a crash leaves either the old file or the new one."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def save(path: str | os.PathLike, target: Any) -> None:
  """Saves any pytree of arrays (a train state, a dict holding one) as msgpack."""
  write_atomic(path, serialization.to_bytes(target))


def restore(path: str | os.PathLike, template: T) -> T:
  """Restores a checkpoint into the structure of `template` (shapes are checked by Flax)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise CheckpointError(f"no checkpoint at {path}")
  try:
    return serialization.from_bytes(template, path.read_bytes())
  except Exception as e:  # msgpack and Flax raise many types for a file that does not fit.
    raise CheckpointError(f"checkpoint {path} does not fit this model and optimizer: {e}") from None
