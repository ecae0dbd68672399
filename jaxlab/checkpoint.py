"""msgpack checkpoints of the full train state (flax.serialization) that can be trusted.

A checkpoint file is one msgpack map:

  {"format": "jaxlab-checkpoint/2", "meta": {...}, "sha256": "<hex>", "payload": <bytes>}

`payload` is `flax.serialization.to_bytes` of the target (a dict holding the train state and
its position); `sha256` is its checksum, so a truncated or bit-flipped file is detected before
anything is restored from it; `meta` says what wrote it (experiment, configuration, layer plan,
step, versions) without reading the payload. Files are written atomically (`write_atomic`).

`AsyncWriter` saves in a background thread: the caller copies the state to the host at a step
boundary, and serializing and writing go on while training does, one save in flight at most.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import pathlib
from typing import Any, Callable, Sequence, TypeVar

import jax
import msgpack
import numpy as np
from flax import serialization

from jaxlab.errors import CheckpointError, CorruptCheckpoint  # noqa: F401 (part of this API)
from jaxlab.metrics import write_atomic

T = TypeVar("T")
FORMAT = "jaxlab-checkpoint/2"


def encode(target: Any, meta: dict[str, Any] | None = None) -> bytes:
  payload = serialization.to_bytes(target)
  return msgpack.packb({"format": FORMAT, "meta": meta or {},
                        "sha256": hashlib.sha256(payload).hexdigest(), "payload": payload})


def save(path: str | os.PathLike | Sequence[str | os.PathLike], target: Any,
         meta: dict[str, Any] | None = None) -> None:
  """Saves any pytree of arrays (a train state, a dict holding one) with its metadata, to one
  path or to each of several (encoded once)."""
  data = encode(target, meta)
  for each in [path] if isinstance(path, (str, os.PathLike)) else path:
    write_atomic(each, data)


def read(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
  """(meta, state dict) of a checkpoint file, its checksum verified."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise CheckpointError(f"no checkpoint at {path}")
  raw = path.read_bytes()
  try:
    outer = msgpack.unpackb(raw, raw=False)
  except Exception as e:  # msgpack raises many types for a damaged file.
    raise CorruptCheckpoint(f"checkpoint {path} is not a readable msgpack file "
                            f"({len(raw)} bytes): {e}") from None
  if not isinstance(outer, dict) or outer.get("format") != FORMAT:
    found = outer.get("format") if isinstance(outer, dict) else type(outer).__name__
    raise CorruptCheckpoint(f"checkpoint {path} is corrupt or not a jaxlab checkpoint: format "
                            f"{found!r}, expected {FORMAT!r}")
  payload = outer.get("payload", b"")
  if hashlib.sha256(payload).hexdigest() != outer.get("sha256"):
    raise CorruptCheckpoint(f"checkpoint {path} is corrupt: its checksum does not match its "
                            f"contents ({len(raw)} bytes)")
  try:
    state_dict = serialization.msgpack_restore(payload)
  except Exception as e:  # msgpack raises many types for a corrupt file.
    raise CorruptCheckpoint(f"checkpoint {path} is not a readable msgpack file "
                            f"({len(raw)} bytes): {e}") from None
  return outer.get("meta") or {}, state_dict


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
  return read(path)[0]


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


def restore_state_dict(state_dict: dict[str, Any], template: T, origin: str) -> T:
  template_dict = serialization.to_state_dict(template)
  check_fits(state_dict, template_dict, origin)
  return serialization.from_state_dict(template, state_dict)


def restore(path: str | os.PathLike, template: T) -> T:
  """Restores a checkpoint into the structure of `template`, checking every name and shape."""
  _, state_dict = read(path)
  return restore_state_dict(state_dict, template, f"checkpoint {path}")


def fingerprint(tree: Any) -> str:
  """A short hash of every array of `tree` (host arrays): equal states, equal fingerprints."""
  return hashlib.sha256(serialization.to_bytes(tree)).hexdigest()[:16]


def to_host(tree: T) -> T:
  """`tree` with every device array copied to host memory (NumPy), the copy owned by the result:
  the device buffers may be donated to the next step while the copy is being written. Arrays
  already on the host (the loop hands hooks a host copy of the state) are kept, not copied
  again."""
  return jax.tree_util.tree_map(
      lambda x: np.array(x, copy=True) if isinstance(x, jax.Array) else x, tree)


class AsyncWriter:
  """Writes checkpoints in one background thread, one save in flight at most.

  `save` waits for the previous save (raising its error, a full disk say, in the training
  loop), then hands over an already host-side copy; `wait` blocks until the last save is on
  disk; `close` waits and stops the thread. With `background=False` every save is written
  before `save` returns (the synchronous baseline)."""

  def __init__(self, background: bool = True):
    self._executor = (concurrent.futures.ThreadPoolExecutor(1, "jaxlab-checkpoint")
                      if background else None)
    self._pending: concurrent.futures.Future | None = None

  def save(self, paths: Sequence[pathlib.Path], target: Any, meta: dict[str, Any],
           after: Callable[[], None] | None = None) -> None:
    """Writes `target` (host arrays) to every path in `paths`, then calls `after`."""
    self.wait()

    def write() -> None:
      data = encode(target, meta)
      for path in paths:
        try:
          write_atomic(path, data)
        except OSError as e:  # A full disk, say: the file it would replace is untouched.
          raise CheckpointError(f"could not write checkpoint {path}: {e.strerror or e}; the "
                                "checkpoints written before it are intact") from e
      if after is not None:
        after()

    if self._executor is None:
      write()
    else:
      self._pending = self._executor.submit(write)

  def wait(self) -> None:
    pending, self._pending = self._pending, None
    if pending is not None:
      pending.result()

  def close(self) -> None:
    try:
      self.wait()
    finally:
      if self._executor is not None:
        self._executor.shutdown(wait=True)
