"""Where jaxlab keeps what it can compute again: decoded data, kernel choices, compiled programs.

  cached(fn)                                     a function's results in this process, by
                                                 the value of its arguments

  $JAXLAB_CACHE_DIR (default ~/.cache/jaxlab)    decoded data sets (jaxlab.data), the kernels
                                                 measured per machine (jaxlab.training.kernels)
  $JAXLAB_XLA_CACHE_DIR (default CACHE_DIR/xla)  JAX's persistent compilation cache
                                                 (jaxlab.training.process)

Imports nothing of JAX: the kernels are chosen, and the compilation cache set, before JAX
starts.
"""

from __future__ import annotations

import functools
import os
import pathlib
import sys
from typing import Any, Callable


def cache_dir() -> pathlib.Path:
  """$JAXLAB_CACHE_DIR, default ~/.cache/jaxlab."""
  return pathlib.Path(os.environ.get("JAXLAB_CACHE_DIR", "~/.cache/jaxlab")).expanduser()


def compilation_cache_dir() -> pathlib.Path:
  """$JAXLAB_XLA_CACHE_DIR if set, else $JAXLAB_CACHE_DIR/xla (default ~/.cache/jaxlab/xla)."""
  if os.environ.get("JAXLAB_XLA_CACHE_DIR"):
    return pathlib.Path(os.environ["JAXLAB_XLA_CACHE_DIR"]).expanduser()
  return cache_dir() / "xla"


def compilation_cache_options(directory: str | os.PathLike | None = None) -> dict[str, Any]:
  """JAX's options for its persistent compilation cache in `directory` (default
  `compilation_cache_dir()`), for every program however quick to compile."""
  path = pathlib.Path(directory) if directory else compilation_cache_dir()
  return {"jax_compilation_cache_dir": str(path), "jax_persistent_cache_min_compile_time_secs": 0,
          "jax_persistent_cache_min_entry_size_bytes": 0}


_CACHED: list[Callable] = []  # Every `cached` function's cache, for `clear_cached`.


def cached(fn: Callable) -> Callable:
  """`functools.lru_cache(maxsize=64)`, keyed by value; a call whose arguments cannot be
  hashed (a model with a list field) runs uncached."""
  memo = functools.lru_cache(maxsize=64)(fn)
  _CACHED.append(memo)

  @functools.wraps(fn)
  def call(*args: Any, **kwargs: Any) -> Any:
    try:
      hash((args, tuple(kwargs.items())))
    except TypeError:
      return fn(*args, **kwargs)
    return memo(*args, **kwargs)

  call.cache_clear = memo.cache_clear
  return call


def clear_cached() -> None:
  """Empties every `cached` function's cache (what a process built: models' shapes, compiled
  steps), so that what they hold can be let go."""
  for memo in _CACHED:
    memo.cache_clear()


def enable_compilation_cache(directory: str | os.PathLike | None = None) -> pathlib.Path:
  """Turns on JAX's persistent compilation cache in `directory` (default
  `compilation_cache_dir()`), for every program however quick to compile: a
  second process (another seed, another learning rate, a resumed run) then loads them instead
  of compiling them. Before JAX is imported, through the environment it reads when it is (so
  that a script that refuses its input does so without importing JAX); after, through
  jax.config."""
  options = compilation_cache_options(directory)
  if "jax" in sys.modules:
    import jax
    for name, value in options.items():
      jax.config.update(name, value)
  else:
    os.environ.update({name.upper(): str(value) for name, value in options.items()})
  return pathlib.Path(options["jax_compilation_cache_dir"])
