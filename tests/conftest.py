"""What the tests share: the environment (no network, no shared caches, one compilation cache
for the whole session and its processes), running the scripts (as processes, or in this
process), and small settings and fixtures.

The suite's tiers: `python3 -m pytest -q` runs everything; `-m "not slow"` leaves out the
tests marked `slow` (those that start processes, train real CNNs or compare every model with
Keras), for the edit-test loop.
"""

import contextlib
import io
import os
import pathlib
import runpy
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent

# Everything a test run reads or writes stays in one temporary folder per session (its worker
# processes, under pytest-xdist, inherit it): the data cache, the compilation cache, and an
# empty TFDS data folder, so that no test can find (or fetch) a real TFDS copy.
_TMP = pathlib.Path(os.environ.setdefault("JAXLAB_TEST_TMP",
                                          tempfile.mkdtemp(prefix="jaxlab-tests-")))
os.environ["JAXLAB_CACHE_DIR"] = str(_TMP / "cache")
os.environ["TFDS_DATA_DIR"] = str(_TMP / "tensorflow_datasets")
os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, str(pathlib.Path(__file__).parent))

# Tests build the same small models many times, in this process and in the scripts they start:
# one persistent compilation cache ($JAXLAB_CACHE_DIR/xla, where the scripts keep theirs) lets
# each program compile once per session.
import jax  # noqa: E402
import pytest  # noqa: E402

from jaxlab import runtime  # noqa: E402

runtime.enable_compilation_cache()

# The settings of a small run on `synthetic_dataset()` (256 examples: 8 steps an epoch).
SMALL = dict(dataset="mnist", epochs=3, batch_size=32, steps_per_dispatch=4, eval_batch_size=64)


def _environment() -> dict[str, str]:
  return {**os.environ, "JAX_PLATFORMS": "cpu"}


def script(name, *args, check=True, timeout=300, env=None):
  """Runs scripts/NAME as a user does, in a process of its own; fails with its stderr unless it
  exits with status 0 (`check=False`: returns whatever it did)."""
  result = subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args], cwd=ROOT,
                          env={**_environment(), **(env or {})}, capture_output=True,
                          text=True, timeout=timeout)
  if check and result.returncode != 0:
    raise AssertionError(f"{name} failed ({result.returncode}):\n{result.stderr[-3000:]}")
  return result


def start_script(name, *args, stdout=subprocess.PIPE, env=None):
  """scripts/NAME started in a process of its own (a Popen with text stdout and stderr), for
  tests that signal, kill or run it beside others."""
  return subprocess.Popen([sys.executable, str(ROOT / "scripts" / name), *args], cwd=ROOT,
                          env={**_environment(), **(env or {})}, stdout=stdout,
                          stderr=subprocess.PIPE, text=True)


def run_main(name, *args):
  """Runs scripts/NAME's `main` in this process, as `python scripts/NAME ARGS` would (flag
  parsing, error handling, exit status), without starting a process and JAX again: for the
  many bad-input cases. Returns a CompletedProcess; the script's flags are removed after it."""
  from absl import flags

  from jaxlab import cli

  before = set(flags.FLAGS)
  namespace = runpy.run_path(str(ROOT / "scripts" / name), run_name=f"jaxlab_script_{name}")
  out, err, code = io.StringIO(), io.StringIO(), 0
  try:
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      try:
        namespace["main"](cli._parse_flags([name, *args]))
      except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
  finally:
    for flag in set(flags.FLAGS) - before:
      delattr(flags.FLAGS, flag)
  return subprocess.CompletedProcess([name, *args], code, out.getvalue(), err.getvalue())
