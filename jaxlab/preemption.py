"""Stopping on SIGTERM or SIGINT at the next step boundary, with a checkpoint, instead of dying.

A preempted machine sends SIGTERM and a user presses Ctrl-C: `stop_on_signals()` (used by the
scripts that train) turns the first such signal into a request that the training loop honours
at its next step boundary (`jaxlab.hooks.StopOnSignal`: a checkpoint, then `Preempted`); a
second signal aborts at once. The flag is process-wide, as signals are.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Iterator

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on request; the same command resumes.
SIGNALS = (signal.SIGTERM, signal.SIGINT)
_requested = threading.Event()


class Preempted(Exception):
  """Training stopped on a signal after saving its position."""

  def __init__(self, message: str):
    super().__init__(message)


def requested() -> bool:
  """Whether a stop was asked for (a signal arrived, or `request()` was called)."""
  return _requested.is_set()


def request() -> None:
  _requested.set()


def clear() -> None:
  _requested.clear()


def _handler(signum: int, frame) -> None:
  name = signal.Signals(signum).name
  if _requested.is_set():
    print(f"\n{name} again: aborting now, without a checkpoint.", file=sys.stderr, flush=True)
    os._exit(128 + signum)
  _requested.set()
  print(f"\n{name}: stopping at the next step boundary after saving a checkpoint "
        f"({name} again aborts at once).", file=sys.stderr, flush=True)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
  """Within the block, SIGTERM and SIGINT ask the training loop to stop (see the module doc)."""
  previous = {s: signal.signal(s, _handler) for s in SIGNALS}
  clear()
  try:
    yield
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
