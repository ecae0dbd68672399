"""Files a crash cannot tear: atomic writes and links, JSON and JSON lines (no JAX here).

What every writer of jaxlab uses: the run directory (`jaxlab.rundir`), the data cache, labs
and reports.
"""

from __future__ import annotations

import errno
import json
import math
import os
import pathlib
import threading
from typing import Any, Iterable

from absl import logging

from jaxlab.errors import writing


def _temporary(path: pathlib.Path) -> pathlib.Path:
  """A name beside `path` for its next version, of this process and thread only."""
  return path.with_name(f"{path.name}.tmp{os.getpid()}-{threading.get_native_id()}")


def write_atomic(path: str | os.PathLike, data: bytes | Iterable[Any]) -> None:
  """Writes `data` (bytes, or buffers written one after another: no copy of them is joined) to
  `path` so that a crash at any moment leaves the old file or the new one: a temporary file,
  flushed and fsynced, renamed over `path`, then the directory fsynced so the rename itself
  survives a power cut. On an error the temporary file is removed and the old file is left as
  it was; a full disk is a `DiskFull` naming `path`."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = _temporary(path)
  try:
    with writing(path), open(tmp, "wb") as f:
      for part in [data] if isinstance(data, (bytes, bytearray, memoryview)) else data:
        f.write(part)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise
  fsync_directory(path.parent)


def link_atomic(source: str | os.PathLike, path: str | os.PathLike) -> None:
  """`path` made another name of the file `source` (a hard link: no byte is written again, and
  the file outlives the removal of `source`), replacing what `path` was in one rename; where the
  file system has no hard links, a copy written as `write_atomic` writes."""
  source, path = pathlib.Path(source), pathlib.Path(path)
  tmp = _temporary(path)
  try:
    os.link(source, tmp)
  except OSError as e:
    if e.errno not in (errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
      raise
    with open(source, "rb") as f:
      write_atomic(path, iter(lambda: f.read(1 << 24), b""))
    return
  try:
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise
  fsync_directory(path.parent)


def fsync_directory(directory: str | os.PathLike) -> None:
  fd = os.open(directory, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def finite_json(obj: Any) -> Any:
  """`obj` with every NaN or infinite float replaced by None: strict JSON readers (jq, most
  languages' parsers) reject `NaN` and `Infinity`, which Python's json writes by default."""
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  if isinstance(obj, dict):
    return {k: finite_json(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [finite_json(v) for v in obj]
  return obj


def dumps(obj: Any, **kwargs: Any) -> str:
  """Strict JSON: non-finite numbers become null."""
  return json.dumps(finite_json(obj), allow_nan=False, **kwargs)


def read_json(path: str | os.PathLike) -> dict[str, Any]:
  """A JSON object from a file; {} where the file is missing, unreadable, not JSON or not an
  object (a run directory's files are read by whoever finds them, whatever state they are in:
  `json_problem` says what is wrong with one)."""
  try:
    found = json.loads(pathlib.Path(path).read_text())
  except (OSError, ValueError):
    return {}
  return found if isinstance(found, dict) else {}


def json_problem(path: str | os.PathLike) -> str | None:
  """What keeps `read_json` from reading a JSON object from `path` ("missing", "not JSON: ...",
  ...), or None where it reads one."""
  try:
    found = json.loads(pathlib.Path(path).read_text())
  except FileNotFoundError:
    return "missing"
  except OSError as e:
    return f"unreadable: {e.strerror or e}"
  except ValueError as e:
    return f"not JSON: {e}"
  return None if isinstance(found, dict) else f"a JSON {type(found).__name__}, not an object"


def write_json(path: str | os.PathLike, obj: Any) -> None:
  write_atomic(path, (dumps(obj, indent=2) + "\n").encode())


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
  """The records of a JSON-lines file. A line that is not JSON (the half-written last line of a
  crash) is skipped and reported, not fatal."""
  path = pathlib.Path(path)
  if not path.exists():
    return []
  records = []
  lines = path.read_text().splitlines()
  for number, line in enumerate(lines, 1):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      where = "its last line" if number == len(lines) else f"line {number}"
      logging.warning("%s: skipped %s, which is not complete JSON (a write cut short?): %.60r",
                      path, where, line)
  return records


def write_jsonl(path: str | os.PathLike, records: list[dict[str, Any]]) -> None:
  write_atomic(path, "".join(dumps(r) + "\n" for r in records).encode())


def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
  """Appends one record as a line, fsynced. After a torn line left by an earlier crash a
  newline comes first, so the new record is a line of its own."""
  path = pathlib.Path(path)
  with writing(path), open(path, "ab") as f:
    if f.tell() > 0:
      with open(path, "rb") as r:
        r.seek(-1, os.SEEK_END)
        if r.read(1) != b"\n":
          f.write(b"\n")
    f.write((dumps(record) + "\n").encode())
    f.flush()
    os.fsync(f.fileno())
