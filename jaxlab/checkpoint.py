"""msgpack checkpoints of the full train state (flax.serialization), written atomically."""

from __future__ import annotations

import os
import pathlib
from typing import Any, TypeVar

import jax
import numpy as np
from flax import serialization

from jaxlab.metrics import write_atomic

T = TypeVar("T")


class CheckpointError(Exception):
  """A checkpoint that is missing or does not fit the model it is restored into."""


def save(path: str | os.PathLike, target: Any) -> None:
  """Saves any pytree of arrays (a train state, a dict holding one) as msgpack."""
  write_atomic(path, serialization.to_bytes(target))


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}/{k}" if prefix else str(k)))
    return out
  return {prefix: tree}


def _shape(x: Any) -> tuple[int, ...] | None:
  if isinstance(x, (np.ndarray, np.generic, jax.Array, int, float)):
    return tuple(np.shape(x))
  return None


def check_fits(state_dict: dict[str, Any], template_dict: dict[str, Any], origin: str) -> None:
  """Raises CheckpointError naming the first entry whose presence or shape differs."""
  got, want = _flatten(state_dict), _flatten(template_dict)
  for key in want:
    if key not in got:
      raise CheckpointError(f"{origin} does not fit: it has no {key!r}")
    if _shape(got[key]) != _shape(want[key]):
      raise CheckpointError(f"{origin} does not fit: {key!r} has shape {_shape(got[key])} in the "
                            f"file but {_shape(want[key])} in the model")
  extra = sorted(set(got) - set(want))
  if extra:
    raise CheckpointError(f"{origin} does not fit: it has {extra[0]!r}, which the model lacks")


def restore(path: str | os.PathLike, template: T) -> T:
  """Restores a checkpoint into the structure of `template`, checking every name and shape."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise CheckpointError(f"no checkpoint at {path}")
  try:
    state_dict = serialization.msgpack_restore(path.read_bytes())
  except Exception as e:  # msgpack raises many types for a corrupt file.
    raise CheckpointError(f"checkpoint {path} is not a readable msgpack file: {e}") from None
  check_fits(state_dict, serialization.to_state_dict(template), f"checkpoint {path}")
  return serialization.from_state_dict(template, state_dict)
