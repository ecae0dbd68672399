"""One writer per directory: an OS file lock, its holder (host, process, start) written in it.

A run directory is written by one process at a time: `train.py`, a lab's worker and
`import_keras.py` hold `DIR/.lock` (`fcntl.flock`, exclusive) while they write it. The
operating system releases the lock when its holder ends, however it ends (SIGKILL included),
so a lock left by a dead process is free to take; the holder it names is then reported as
gone, in a warning. A process that asks for a directory it already holds gets it again (a lab
worker claims a run, then trains it).

On a shared file system, `flock` is as reliable as the file system makes it: NFS v4 and
Lustre (mounted with `flock`) and GPFS lock across machines; NFS v3 without a lock manager, or
a mount with `nolock`/`local_lock`, locks only within one machine, and two machines could then
both write one run. jaxlab assumes a file system whose locks hold across the machines that
share it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pathlib
import socket
import time
from typing import Any, Iterator

from absl import logging

from jaxlab.errors import BadValue

LOCK_FILE = ".lock"


class BusyError(BadValue):
  """A directory that another process holds (a user error: status 2, one line)."""

  def __init__(self, message: str, holder: dict[str, Any]):
    super().__init__(message)
    self.holder = holder


def describe_holder(holder: dict[str, Any]) -> str:
  if not holder:
    return "another process"
  return (f"process {holder.get('pid')} on {holder.get('host')} (since "
          f"{holder.get('started', '?')}{', ' + holder['command'] if holder.get('command') else ''})")


def _holder() -> dict[str, Any]:
  import sys
  return {"host": socket.gethostname(), "pid": os.getpid(),
          "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
          "command": " ".join(os.path.basename(a) if i == 0 else a
                              for i, a in enumerate(sys.argv[:3]))}


def _read(fd: int) -> dict[str, Any]:
  try:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 65536).decode()
    found = json.loads(text) if text.strip() else {}
    return found if isinstance(found, dict) else {}
  except (OSError, ValueError):
    return {}


# The locks this process holds: directory -> (file descriptor, times taken).
_HELD: dict[pathlib.Path, list[int]] = {}


def holder_of(directory: str | os.PathLike) -> dict[str, Any] | None:
  """Who holds `directory` now (None where nobody does), without taking it."""
  path = pathlib.Path(directory).resolve()
  if path in _HELD:
    return _holder()
  try:
    fd = os.open(path / LOCK_FILE, os.O_RDONLY)
  except OSError:
    return None
  try:
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
  except BlockingIOError:
    found = _read(fd)
    os.close(fd)
    return found or {"host": "?", "pid": "?"}
  os.close(fd)
  return None


def refuse_busy(*directories: str | os.PathLike, what: str = "run directory") -> None:
  """Raises BusyError, naming the holder, for the first of `directories` that another process
  holds: a script's check before its slow start (importing JAX, loading data), so that a second
  process on a busy directory is refused at once. `acquire` is still what guarantees it."""
  for directory in directories:
    holder = holder_of(directory)
    if holder is not None and pathlib.Path(directory).resolve() not in _HELD:
      raise BusyError(_busy_message(what, directory, holder), holder)


def _busy_message(what: str, directory: str | os.PathLike, holder: dict[str, Any]) -> str:
  return (f"{what} {directory} is being written by {describe_holder(holder)}; wait for it to "
          "end, or stop it")


def acquire(directory: str | os.PathLike, what: str = "run directory") -> None:
  """Takes `directory`'s lock, or raises BusyError naming its holder, at once. Taken again by
  the process that holds it, it counts (each `acquire` wants a `release`)."""
  path = pathlib.Path(directory).resolve()
  if path in _HELD:
    _HELD[path][1] += 1
    return
  path.mkdir(parents=True, exist_ok=True)
  fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    holder = _read(fd)
    os.close(fd)
    raise BusyError(_busy_message(what, directory, holder), holder) from None
  previous = _read(fd)
  if previous.get("pid") is not None:
    logging.warning("%s %s: taking over the lock of %s, which is gone", what, directory,
                    describe_holder(previous))
  os.ftruncate(fd, 0)
  os.lseek(fd, 0, os.SEEK_SET)
  os.write(fd, json.dumps(_holder()).encode())
  os.fsync(fd)
  _HELD[path] = [fd, 1]


def release(directory: str | os.PathLike) -> None:
  """Gives the lock back (the last of this process's `acquire`s of it): the holder is erased,
  so the next one finds no stale holder."""
  path = pathlib.Path(directory).resolve()
  held = _HELD.get(path)
  if not held:
    return
  held[1] -= 1
  if held[1]:
    return
  del _HELD[path]
  fd = held[0]
  try:
    os.ftruncate(fd, 0)
  except OSError:
    pass
  fcntl.flock(fd, fcntl.LOCK_UN)
  os.close(fd)


def release_all() -> None:
  """Gives back every lock this process holds, however many times taken: for a process that
  ends at once (`os._exit`) in a clean stop, so that the next finds no stale holder."""
  for path in list(_HELD):
    _HELD[path][1] = 1
    release(path)


@contextlib.contextmanager
def holding(*directories: str | os.PathLike, what: str = "run directory") -> Iterator[None]:
  """Holds every one of `directories` (all or none: a busy one releases those taken)."""
  taken = []
  try:
    for directory in directories:
      acquire(directory, what)
      taken.append(directory)
    yield
  finally:
    for directory in reversed(taken):
      release(directory)


@contextlib.contextmanager
def waiting(directory: str | os.PathLike, what: str = "lab") -> Iterator[None]:
  """Holds `directory`'s lock, waiting for it (for short read-modify-writes, as of lab.json)."""
  path = pathlib.Path(directory)
  path.mkdir(parents=True, exist_ok=True)
  fd = os.open(path / f".{what}.lock", os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
