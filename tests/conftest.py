"""What the tests share: the environment (no network, no shared data caches, one compilation
cache), running the scripts (as processes, or in this process), and small settings.

The suite's tiers: `python3 -m pytest -q` runs everything; `-m "not slow"` leaves out the
tests marked `slow` (those that start processes, train real CNNs or compare every model with
Keras), for the edit-test loop.
"""

import atexit
import contextlib
import gc
import io
import logging as std_logging
import os
import pathlib
import runpy
import shutil
import subprocess
import sys
import tempfile
import traceback

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

# What a test run reads or writes stays in one temporary folder per session (its worker
# processes, under pytest-xdist, inherit it): the data cache, and an empty TFDS data folder,
# so that no test can find (or fetch) a real TFDS copy. The process that makes it removes it
# when the session ends (`pytest_unconfigure`, and at exit); a session killed before that
# leaves it to the next one, which removes every such folder whose process is gone.
TMP_PREFIX = "jaxlab-tests-"


def _remove_orphans() -> None:
  for folder in pathlib.Path(tempfile.gettempdir()).glob(f"{TMP_PREFIX}*"):
    pid = folder.name[len(TMP_PREFIX):].split("-")[0]
    if not pid.isdigit():
      continue
    try:
      os.kill(int(pid), 0)
    except ProcessLookupError:
      shutil.rmtree(folder, ignore_errors=True)
    except PermissionError:  # Another user's live process.
      pass


if "JAXLAB_TEST_TMP" not in os.environ:
  _remove_orphans()
  os.environ["JAXLAB_TEST_TMP"] = tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-")
  _MADE_HERE = True
  atexit.register(shutil.rmtree, os.environ["JAXLAB_TEST_TMP"], ignore_errors=True)
else:
  _MADE_HERE = False
_TMP = pathlib.Path(os.environ["JAXLAB_TEST_TMP"])
os.environ["JAXLAB_CACHE_DIR"] = str(_TMP / "cache")
os.environ["TFDS_DATA_DIR"] = str(_TMP / "tensorflow_datasets")
# Compiling is most of the suite's time. Compiled programs are kept between runs of the suite
# in one persistent compilation cache (JAX's, keyed by the program, its compile options and the
# JAX version, so an edit that changes a program compiles it anew), shared by this process and
# the scripts the tests start: $JAXLAB_TEST_XLA_CACHE, default ~/.cache/jaxlab/test-xla. Delete
# it for a cold run.
XLA_CACHE = pathlib.Path(os.environ.get("JAXLAB_TEST_XLA_CACHE",
                                        "~/.cache/jaxlab/test-xla")).expanduser()
os.environ["JAXLAB_XLA_CACHE_DIR"] = str(XLA_CACHE)
# At most 2 GiB, the least recently used entries going first: JAX then keeps each entry's last
# use in a KEY-atime file beside KEY-cache and reads them all before every write. Every process
# on the cache must share the limit (JAX reads it from this variable; the scripts the tests
# start inherit it): one without a limit writes entries without an -atime file, and then every
# write of a process with one fails ("FileNotFoundError: ...-atime"), and that process's
# programs are compiled again by every run of the suite. Entries written so are given one.
os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(2 * 2**30)
if XLA_CACHE.is_dir():
  for _entry in XLA_CACHE.glob("*-cache"):
    _atime = _entry.with_name(_entry.name[:-len("-cache")] + "-atime")
    if not _atime.exists():
      _atime.write_bytes(int(_entry.stat().st_mtime_ns).to_bytes(8, "little"))
os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, str(pathlib.Path(__file__).parent))

# Compiling is most of what the tests do, and their programs run on tiny data: XLA's backend
# optimizations (LLVM's) cost a third of the compile time and change no result a test checks
# here (a program compiled either way computes the same values up to float rounding). The
# scripts that tests start as processes compile the same way (`script_environment`), so that a
# run started in a process and resumed in this one (or the other way) is bit for bit the run
# either would have made alone, and both share the compilation cache.
# (Worker processes of pytest-xdist inherit this process's settings: the user's flags are kept
# aside once, by the first.)
# XLA:CPU's kernels (jaxlab.training.kernels) are those of $JAXLAB_TEST_KERNELS (default xla, XLA as it
# comes), here and in every script a test starts, so that no test measures the machine: run
# the suite with JAXLAB_TEST_KERNELS=ynn_dot (say) to check it under another choice.
_USER_XLA_FLAGS = os.environ.setdefault("JAXLAB_TEST_USER_XLA_FLAGS",
                                        os.environ.get("XLA_FLAGS", ""))
from jaxlab.training import kernels  # noqa: E402  (no JAX: before the backend starts)

KERNELS = os.environ.setdefault("JAXLAB_TEST_KERNELS", "xla")
os.environ["JAXLAB_KERNELS"] = KERNELS
SCRIPT_XLA_FLAGS = f"{_USER_XLA_FLAGS} --xla_backend_optimization_level=0".strip()
os.environ["XLA_FLAGS"] = f"{SCRIPT_XLA_FLAGS} {kernels.KERNELS[KERNELS]}".strip()
os.environ[kernels.APPLIED_ENV] = KERNELS

import jax  # noqa: E402

from jaxlab import caches  # noqa: E402

caches.enable_compilation_cache()  # XLA_CACHE, as the scripts' --compilation_cache.

def pytest_unconfigure(config):
  """The session's temporary folder goes with the session, however its tests ended."""
  if _MADE_HERE:
    shutil.rmtree(_TMP, ignore_errors=True)


GROUPING_FIXTURES = ("reference",)  # tests/test_keras.py's one Keras model at a time.


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items):
  """Tests parametrized through a module-scoped fixture of GROUPING_FIXTURES run grouped by its
  value, in the order each value first appears: pytest then builds each value once and lets it
  go before the next. (pytest's own grouping keys on a value's index in each test's list, so
  tests that list one value at different indexes would build it more than once.)"""
  positions = [i for i, item in enumerate(items)
               if any(n in getattr(getattr(item, "callspec", None), "params", {})
                      for n in GROUPING_FIXTURES)]
  grouped = [items[i] for i in positions]
  first: dict = {}
  for item in grouped:
    first.setdefault(_group_value(item), len(first))
  for i, item in zip(positions, sorted(grouped, key=lambda item: first[_group_value(item)])):
    items[i] = item


def _group_value(item):
  params = item.callspec.params
  return (item.path, repr([params[n] for n in GROUPING_FIXTURES if n in params]))


@pytest.fixture(scope="module", autouse=True)
def _forget_what_the_module_built():
  """After each test module, what it compiled and built is let go (every jitted program, the
  models and steps cached per process, Keras's state): the next module starts small, and a
  program it needs again comes back from the persistent compilation cache in milliseconds."""
  yield
  caches.clear_cached()
  if "keras" in sys.modules:
    sys.modules["keras"].backend.clear_session()
  jax.clear_caches()
  gc.collect()


# The settings of a small run on `synthetic_dataset()` (256 examples: 8 steps an epoch).
SMALL = dict(dataset="mnist", epochs=3, batch_size=32, steps_per_dispatch=4, eval_batch_size=64)


def script_environment(**extra: str) -> dict[str, str]:
  """The environment of a process a test starts: this one's, on the CPU, compiling as this
  one does (SCRIPT_XLA_FLAGS; its kernels come from $JAXLAB_KERNELS, applied by the script as
  a user's are), and `extra`."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": SCRIPT_XLA_FLAGS}
  env.pop(kernels.APPLIED_ENV)
  return {**env, **extra}


def script(name, *args, check=True, timeout=300, env=None):
  """Runs scripts/NAME as a user does, in a process of its own; fails with its stderr unless it
  exits with status 0 (`check=False`: returns whatever it did)."""
  result = subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args], cwd=ROOT,
                          env=script_environment(**(env or {})), capture_output=True,
                          text=True, timeout=timeout)
  if check and result.returncode != 0:
    raise AssertionError(f"{name} failed ({result.returncode}):\n{result.stderr[-3000:]}")
  return result


def start_script(name, *args, stdout=subprocess.PIPE, env=None):
  """scripts/NAME started in a process of its own (a Popen with text stdout and stderr), for
  tests that signal, kill or run it beside others."""
  return subprocess.Popen([sys.executable, str(ROOT / "scripts" / name), *args], cwd=ROOT,
                          env=script_environment(**(env or {})), stdout=stdout,
                          stderr=subprocess.PIPE, text=True)


def run_main(name, *args):
  """Runs scripts/NAME's `main` in this process, as `python scripts/NAME ARGS` would (flag
  parsing, error handling, exit status; an exception that escapes `main`, a bug, is printed
  with its traceback and gives status 1, as Python does), without starting a process and JAX
  again. Returns a CompletedProcess; the script's flags are removed after it."""
  from absl import flags
  from absl import logging as absl_logging

  from jaxlab import cli

  before = set(flags.FLAGS)
  namespace = runpy.run_path(str(ROOT / "scripts" / name), run_name=f"jaxlab_script_{name}")
  out, err, code = io.StringIO(), io.StringIO(), 0
  # The script's log lines (absl's handler keeps the stderr it started with) go to its stderr.
  logger, verbosity = absl_logging.get_absl_logger(), absl_logging.get_verbosity()
  handler = std_logging.StreamHandler(err)
  handler.setFormatter(std_logging.Formatter("%(levelname).1s %(message)s"))
  logger.addHandler(handler)
  try:
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      try:
        namespace["main"](cli._parse_flags([name, *args]))
      except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
      except Exception:  # noqa: BLE001  What Python does with an exception that escapes.
        traceback.print_exc()
        code = 1
  finally:
    logger.removeHandler(handler)
    absl_logging.set_verbosity(verbosity)
    for flag in set(flags.FLAGS) - before:
      delattr(flags.FLAGS, flag)
  return subprocess.CompletedProcess([name, *args], code, out.getvalue(), err.getvalue())
