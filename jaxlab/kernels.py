"""XLA:CPU's kernel libraries: the one this machine runs fastest, measured once and cached.

XLA:CPU can hand dots and convolutions to other kernel libraries (YNNPACK, oneDNN) through
`XLA_FLAGS`, which the backend reads once, when it starts. Which is fastest depends on the CPU
(AlexNet's train step on a 2-core AMD EPYC: 5.30 s as XLA comes, 3.56 s with YNNPACK's dot
fusions). `choose` times a small convolution-and-dense training step under each candidate, each
in its own process, keeps only candidates whose gradients are as close to the exact (float64)
ones as XLA's own, and caches the choice under `$JAXLAB_CACHE_DIR/kernels.json`, keyed on the CPU and the
jaxlib version: the first choice costs seconds, later ones nothing. `apply` sets `XLA_FLAGS`
before the backend starts (every script does, through `jaxlab.cli`); `--kernels` overrides, and
a resumed run keeps the kernels it started with (`config.json`'s environment).

This module imports no JAX: it must run before JAX starts.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

from jaxlab.data import default_cache_dir

# Name -> the XLA flags that select it. "xla" is XLA:CPU as it comes.
KERNELS: dict[str, str] = {
    "xla": "",
    "ynn_dot": "--xla_cpu_experimental_ynn_fusion_type=dot",
    "ynn_dot_eltwise": "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce",
}
CHOICES = ("auto", *KERNELS)
ENV = "JAXLAB_KERNELS"  # The scripts' --kernels; "auto" where unset.
APPLIED_ENV = "JAXLAB_KERNELS_APPLIED"  # What this process's backend started with.
# A candidate must beat XLA as it comes by this much to be chosen (timing noise is a few %).
MARGIN = 0.05
RTOL = 1e-4  # Gradients' error against float64 always allowed, relative to each array's scale.


def cache_file() -> pathlib.Path:
  return default_cache_dir() / "kernels.json"


def cpu() -> tuple[str, str]:
  """This machine's CPU model name and its feature flags, as /proc/cpuinfo names them."""
  model, features = "", ""
  try:
    for line in open("/proc/cpuinfo"):
      if line.startswith("model name") and not model:
        model = line.split(":", 1)[1].strip()
      elif line.startswith("flags") and not features:
        features = line.split(":", 1)[1].strip()
  except OSError:
    import platform
    model = platform.processor() or platform.machine()
  return model, features


def machine_key() -> str:
  """The CPU (model name and feature flags) and the jaxlib version: what decides the choice."""
  model, features = cpu()
  try:
    jaxlib = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    jaxlib = "unknown"
  digest = hashlib.sha256(features.encode()).hexdigest()[:12]
  return f"{model} | flags {digest} | {os.cpu_count()} cores | jaxlib {jaxlib}"


def _gpu_possible() -> bool:
  """Whether JAX may start on a GPU here (a CUDA plugin installed, JAX_PLATFORMS not cpu): then
  the CPU's kernels do not matter, and nothing is measured."""
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms and "cuda" not in platforms and "gpu" not in platforms:
    return False
  import importlib.util
  return any(importlib.util.find_spec(p) for p in ("jax_cuda12_plugin", "jax_cuda13_plugin"))


def measure(name: str, out: pathlib.Path, repeats: int = 5) -> dict[str, Any]:
  """Times `name` in a process of its own (XLA_FLAGS are read once per process): the median of
  `repeats` calls of a compiled conv + dense training step; its gradients go to `out` (.npz)."""
  env = {**os.environ, "XLA_FLAGS": f"{_user_flags()} {KERNELS[name]}".strip(),
         "JAX_PLATFORMS": "cpu"}
  done = subprocess.run([sys.executable, "-m", "jaxlab.kernels", str(out), str(repeats),
                         str(int(name == "xla"))],
                        env=env, capture_output=True, text=True, timeout=300)
  if done.returncode != 0:
    return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
  return json.loads(done.stdout.strip().splitlines()[-1])


def _workload(out: str, repeats: int, exact: bool) -> None:
  """The measured step (run by `measure` in its own process): a 5x5 convolution, max pooling
  and two Dense layers, forward and backward, at batch 16 on 28x28 inputs. Writes its float32
  gradients, and with `exact` the same gradients in float64 (the reference every candidate is
  held to)."""
  import jax
  jax.config.update("jax_enable_x64", True)  # Only for the reference: the rest is float32.
  import jax.numpy as jnp
  import numpy as np

  rng = np.random.default_rng(0)
  batch = 16
  x = rng.random((batch, 28, 28, 16), np.float32)
  params = {"conv": rng.normal(0, 0.05, (5, 5, 16, 64)).astype(np.float32),
            "dense": rng.normal(0, 0.02, (14 * 14 * 64, 128)).astype(np.float32),
            "out": rng.normal(0, 0.05, (128, 10)).astype(np.float32)}
  labels = jnp.asarray(rng.integers(0, 10, batch))

  def loss(p, x):
    h = jax.lax.conv_general_dilated(x, p["conv"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = jax.lax.reduce_window(jax.nn.relu(h), -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1),
                              "VALID")
    h = jax.nn.relu(h.reshape(batch, -1) @ p["dense"])
    return -jnp.mean(jax.nn.log_softmax(h @ p["out"])[jnp.arange(batch), labels])

  step = jax.jit(jax.grad(loss))
  args = ({k: jnp.asarray(v) for k, v in params.items()}, jnp.asarray(x))
  jax.block_until_ready(step(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    grads = jax.block_until_ready(step(*args))
    times.append(time.perf_counter() - start)
  np.savez(out, **{k: np.asarray(v) for k, v in grads.items()})
  if exact:
    exact = jax.jit(jax.grad(loss))({k: jnp.asarray(v, jnp.float64) for k, v in params.items()},
                                    jnp.asarray(x, jnp.float64))
    np.savez(out.replace(".npz", ".exact.npz"), **{k: np.asarray(v) for k, v in exact.items()})
  print(json.dumps({"seconds": sorted(times)[len(times) // 2]}))


def _error(path: pathlib.Path, exact: pathlib.Path) -> float:
  """The largest difference of a candidate's gradients from the float64 ones, relative to each
  array's scale."""
  import numpy as np
  with np.load(path) as found, np.load(exact) as want:
    return float(max(np.abs(found[k] - want[k]).max() / max(np.abs(want[k]).max(), 1e-30)
                     for k in want.files))


def choose(log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
           refresh: bool = False) -> dict[str, Any]:
  """This machine's kernels: from the cache, or measured now (and cached). The record holds the
  name, its flags, and every candidate's seconds, error against float64 and whether that is
  within float rounding."""
  key, path = machine_key(), cache_file()
  try:
    cached = json.loads(path.read_text())
  except (OSError, ValueError):
    cached = {}
  if key in cached and not refresh and cached[key].get("name") in KERNELS:
    return cached[key]
  log(f"measuring XLA:CPU's kernel libraries on this machine, once ({', '.join(KERNELS)})")
  candidates = {}
  with tempfile.TemporaryDirectory() as tmp:
    outputs = {name: pathlib.Path(tmp) / f"{name}.npz" for name in KERNELS}
    for name in KERNELS:
      try:  # A candidate that fails to run or to load is left out, never the run.
        candidates[name] = measure(name, outputs[name])
        if "error" not in candidates[name]:
          candidates[name]["relative_error"] = _error(
              outputs[name], outputs["xla"].with_suffix(".exact.npz"))
      except Exception as e:  # noqa: BLE001
        candidates[name] = {"error": f"{type(e).__name__}: {e}"}
  best = "xla"
  if "error" not in candidates["xla"]:
    # Within float rounding: no further from the exact gradients than XLA's own (twice its
    # error, at least RTOL).
    bound = max(RTOL, 2 * candidates["xla"]["relative_error"])
    for c in candidates.values():
      if "error" not in c:
        c["same_results"] = c["relative_error"] <= bound
    limit = candidates["xla"]["seconds"] * (1 - MARGIN)
    usable = {n: c["seconds"] for n, c in candidates.items()
              if c.get("same_results") and c["seconds"] < limit}
    if usable:  # The fastest; of those within MARGIN of it, the first listed (the simplest).
      fastest = min(usable.values())
      best = next(n for n in usable if usable[n] <= fastest * (1 + MARGIN))
  record = {"name": best, "xla_flags": KERNELS[best], "machine": key,
            "measured": time.strftime("%Y-%m-%dT%H:%M:%S"), "candidates": candidates}
  log("  " + ", ".join(f"{n}: " + (f"{c['seconds'] * 1e3:.1f} ms"
                                   + ("" if c.get("same_results", True) else " (results off)")
                                   if "seconds" in c else c["error"])
                       for n, c in candidates.items()) + f" -> {best}")
  cached[key] = record
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(cached, indent=2) + "\n")
    os.replace(tmp, path)
  except OSError as e:
    log(f"  (not cached: {e})")
  return record


def _user_flags() -> str:
  """XLA_FLAGS without any kernel flags this module adds."""
  flags = os.environ.get("XLA_FLAGS", "").split()
  ours = {f for v in KERNELS.values() for f in v.split()}
  return " ".join(f for f in flags if f not in ours)


def _backend_started() -> bool:
  bridge = sys.modules.get("jax._src.xla_bridge")
  return bool(bridge and getattr(bridge, "_backends", None))


def apply(choice: str | None = None, started_with: str | None = None) -> str:
  """Sets XLA_FLAGS for the kernels of `choice` (default $JAXLAB_KERNELS, else "auto": this
  machine's measured choice, or "xla" where JAX may run on a GPU), unless `started_with` (a
  resumed run's) names them and `choice` is "auto". Returns the name applied. Once the backend
  has started its flags are fixed: then nothing changes, and the name is what it started with."""
  if _backend_started():
    return applied()
  choice = choice or os.environ.get(ENV) or "auto"
  if choice not in CHOICES:
    raise ValueError(f"unknown kernels {choice!r}; known: {', '.join(CHOICES)}")
  if choice == "auto":
    if started_with in KERNELS:
      choice = started_with
    elif _gpu_possible():
      choice = "xla"
    else:
      choice = choose()["name"]
  os.environ["XLA_FLAGS"] = f"{_user_flags()} {KERNELS[choice]}".strip()
  os.environ[APPLIED_ENV] = choice
  return choice


def applied() -> str:
  """The kernels this process's backend runs: what `apply` set, else read from XLA_FLAGS."""
  if os.environ.get(APPLIED_ENV) in KERNELS:
    flags = set(os.environ.get("XLA_FLAGS", "").split())
    name = os.environ[APPLIED_ENV]
    if set(KERNELS[name].split()) <= flags:
      return name
  flags = set(os.environ.get("XLA_FLAGS", "").split())
  named = [n for n, f in KERNELS.items() if f and set(f.split()) <= flags]
  return named[-1] if named else "xla"


if __name__ == "__main__":
  _workload(sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1")
