"""Run-directory files: atomic writes, one JSON line per epoch, JSON summaries (no JAX here)."""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any



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


def write_json(path: str | os.PathLike, obj: Any) -> None:
  write_atomic(path, (json.dumps(obj, indent=2) + "\n").encode())


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
  """The records of a JSON-lines file; a torn last line (a crash mid-write) is dropped."""
  path = pathlib.Path(path)
  if not path.exists():
    return []
  records = []
  for line in path.read_text().splitlines():
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      break
  return records


def write_jsonl(path: str | os.PathLike, records: list[dict[str, Any]]) -> None:
  write_atomic(path, "".join(json.dumps(r) + "\n" for r in records).encode())


def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
  with open(path, "a") as f:
    f.write(json.dumps(record) + "\n")
    f.flush()
    os.fsync(f.fileno())
