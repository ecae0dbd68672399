"""Workers of a lab on one machine: one device each (a GPU, or a share of the CPU cores).

`run_lab.py --workers=N` starts N processes of the same command, each given its device
(`worker_devices`), forwards SIGTERM and SIGINT to them and exits with the status that says
most. The processes share the lab as any workers do (`jaxlab.lab.runner`).
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Sequence

from jaxlab.errors import EXIT_BAD_INPUT, EXIT_PREEMPTED, BadValue


def _gpus() -> list[str]:
  """This machine's GPUs as CUDA_VISIBLE_DEVICES names them (that variable's list where it is
  set, else nvidia-smi's), without starting JAX; none on a machine without them."""
  visible = os.environ.get("CUDA_VISIBLE_DEVICES")
  if visible is not None:
    return [d for d in visible.split(",") if d.strip() and d.strip() != "-1"]
  import shutil
  import subprocess
  if not shutil.which("nvidia-smi"):
    return []
  try:
    listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
  except (OSError, subprocess.SubprocessError):
    return []
  return [str(i) for i, line in enumerate(listed.stdout.splitlines()) if line.startswith("GPU")]


def worker_devices(workers: int) -> list[dict[str, Any]]:
  """What each of `workers` processes on this machine gets: one GPU each where there are GPUs
  (`CUDA_VISIBLE_DEVICES`), else an equal share of the CPU cores this process may use (its CPU
  affinity, which sets the size of XLA's thread pool)."""
  if workers < 1:
    raise BadValue(f"--workers must be a positive integer, got {workers}")
  gpus = _gpus()
  if gpus:
    if workers > len(gpus):
      raise BadValue(f"--workers={workers}, but this machine has {len(gpus)} GPUs "
                     f"({','.join(gpus)}): one worker per GPU")
    return [{"env": {"CUDA_VISIBLE_DEVICES": gpus[k]}, "cores": None} for k in range(workers)]
  cores = sorted(os.sched_getaffinity(0))
  if workers > len(cores):
    raise BadValue(f"--workers={workers}, but this process may use {len(cores)} CPU cores "
                   "(at least one per worker)")
  shares = [cores[k * len(cores) // workers:(k + 1) * len(cores) // workers]
            for k in range(workers)]
  return [{"env": {"JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}, "cores": share}
          for share in shares]


def run_workers(workers: int, argv: Sequence[str],
                say: Callable[[str], None] = lambda line: print(line, file=sys.stderr)) -> int:
  """Starts `workers` processes of `argv` (a `run_lab.py` command without --workers) on this
  machine, one device each (`worker_devices`), forwards SIGTERM and SIGINT to them, waits, and
  returns the status to exit with: EXIT_PREEMPTED if any was stopped by a signal (the same
  command resumes), else EXIT_BAD_INPUT, else 1 if a run failed, else 0."""
  import signal
  import subprocess

  devices = worker_devices(workers)
  procs = []
  for k, device in enumerate(devices):
    cores = device["cores"]
    env = {**os.environ, **device["env"], "JAXLAB_WORKER": f"{k + 1}/{workers}"}
    procs.append(subprocess.Popen(
        list(argv), env=env,
        preexec_fn=(lambda c=cores: os.sched_setaffinity(0, c)) if cores else None))
    say(f"worker {k + 1}/{workers}: process {procs[-1].pid}, "
        + (f"CPU cores {','.join(map(str, cores))}" if cores
           else f"GPU {device['env']['CUDA_VISIBLE_DEVICES']}"))

  def forward(signum, frame):
    for p in procs:
      if p.poll() is None:
        p.send_signal(signum)

  previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    codes = [p.wait() for p in procs]
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
  for code in (EXIT_PREEMPTED, EXIT_BAD_INPUT, 1):
    if code in codes:
      return code
  return 0 if all(c == 0 for c in codes) else max(abs(c) for c in codes)
