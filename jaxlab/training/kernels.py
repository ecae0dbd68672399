"""XLA:CPU's kernel libraries: the fastest here per kind of model, measured once and cached.

XLA:CPU can hand dots and convolutions to other kernel libraries (YNNPACK, oneDNN). Which is
fastest depends on the CPU and on the model: on a 2-core AMD EPYC, AlexNet's train step takes
5.30 s as XLA comes and 3.56 s with `ynn_dot`, while an MLP's step is no faster with it. (With
jaxlib 0.10.2, XLA's default sends single dots and convolutions to YNNPACK; `ynn_dot`'s list
replaces the default's, leaving convolutions to XLA's own kernels, whose backward pass ran at
40-44 GFLOP/s there against YNNPACK's 18-22: `scripts/probe_kernels.py` shows which library
runs what.)

`choose` times two small training steps, one of a convolution network and one of an MLP
(`KINDS`), under each candidate, compiled with the candidate's compiler options in a process of
its own (`isolated`: a candidate that kills it is reported and the rest measured in a new
one), the candidates' repetitions interleaved; it keeps only candidates whose gradients
are as close to the exact (float64) ones as XLA's own, and caches the choice per kind under
`$JAXLAB_CACHE_DIR/kernels.json`, keyed on the CPU and the jaxlib version: the first choice
costs seconds, later ones nothing. `apply` sets `XLA_FLAGS` for the kind of model a command
runs before the backend starts (every script does, through `jaxlab.training.process.start`); `--kernels`
overrides, and a resumed run keeps the kernels it started with (`config.json`'s environment).

This module imports no JAX: it must run before JAX starts.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

from jaxlab.caches import cache_dir
from jaxlab.errors import BadValue
from jaxlab.files import read_json, write_json

# Name -> the XLA flags that select it for a process. "xla" is XLA:CPU as it comes.
KERNELS: dict[str, str] = {
    "xla": "",
    "ynn_dot": "--xla_cpu_experimental_ynn_fusion_type=dot",
    "ynn_dot_eltwise": "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce",
    # oneDNN's fusions (its graph API) take the dots: the only route from JAX to AMX for
    # bfloat16 (kept in bfloat16 where the CPU has AVX512-BF16). Not among the candidates: with
    # jaxlib 0.10.2 (a 2-core AMD EPYC), oneDNN fails to compile a dot fused with an
    # elementwise producer, such as the sum of two branches (`mlp_parallel_paths`' forward
    # pass, batch normalization's backward pass), and XLA then kills the process (SIGILL,
    # "partition compile failed"); and programs with oneDNN fusions cannot be kept in JAX's
    # persistent compilation cache. `scripts/probe_kernels.py` shows what it does on a CPU.
    "onednn_dot": "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot",
}
# The candidates "auto" chooses among: ynn_dot_eltwise was no faster than ynn_dot for AlexNet
# (3.82 s against 3.56 s a step on a 2-core AMD EPYC) nor for an MLP, and the suite's Keras
# parity is checked under these (JAXLAB_TEST_KERNELS); it and onednn_dot stay available by name.
CANDIDATES = ("xla", "ynn_dot")
# Each, as the compiler options of one program (how `choose` measures them side by side).
OPTIONS: dict[str, dict[str, Any]] = {
    "xla": {},
    "ynn_dot": {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"},
    "ynn_dot_eltwise": {"xla_cpu_experimental_ynn_fusion_type":
                        "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE,"
                        "LIBRARY_FUSION_TYPE_REDUCE"},
    "onednn_dot": {"xla_cpu_use_onednn": True,
                   "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"},
}
CHOICES = ("auto", *KERNELS)
# Kinds of model, chosen for apart: "conv", a model with convolutions; "dense", one without;
# each in float32 and in bf16 (as XLA:CPU runs it: dots on bfloat16 operands written in float32,
# convolutions in float32; jaxlab.models.at_precision), whose dots other kernels run best.
KINDS = ("conv", "dense", "conv_bf16", "dense_bf16")
ENV = "JAXLAB_KERNELS"  # The scripts' --kernels; "auto" where unset.
APPLIED_ENV = "JAXLAB_KERNELS_APPLIED"  # What this process's backend started with.
# A candidate must beat XLA as it comes by this much to be chosen (timing noise is a few %).
MARGIN = 0.05
RTOL = 1e-4  # Gradients' error against float64 always allowed, relative to each array's scale.
SAMPLE_SECONDS = 0.05  # A timed sample repeats a quick step until it lasts about this long.


def cache_file() -> pathlib.Path:
  return cache_dir() / "kernels.json"


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


def gpu_possible() -> bool:
  """Whether JAX may start on a GPU here (a CUDA plugin installed, JAX_PLATFORMS not cpu): then
  the CPU's kernels do not matter, and nothing is measured."""
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms and "cuda" not in platforms and "gpu" not in platforms:
    return False
  import importlib.util
  return any(importlib.util.find_spec(p) for p in ("jax_cuda12_plugin", "jax_cuda13_plugin"))


def measure(out: pathlib.Path, repeats: int = 9) -> dict[str, dict[str, dict[str, Any]]]:
  """Times every candidate on every kind's step in a process of its own, with the user's XLA
  flags but none of the kernels': {kind: {name: {"seconds": median} or {"error": why}}}. Each
  kind's gradients go to out/KIND.NAME.npz, and in float64 to out/KIND.exact.npz. A candidate
  that kills the process (an XLA abort) is reported as an error; the others are measured in a
  new process."""
  results, crashed = isolated([sys.executable, "-m", "jaxlab.training.kernels", str(out), str(repeats)],
                              measuring_environment())
  found: dict[str, dict[str, dict[str, Any]]] = {kind: {} for kind in KINDS}
  for item, why in crashed.items():
    kind, name = item.split("/")
    found[kind][name] = {"error": why}
  for kind, candidates in results.items():
    found[kind].update(candidates)
  return {kind: {n: found[kind][n] for n in CANDIDATES if n in found[kind]} for kind in found}


def isolated(argv: list[str], env: dict[str, str] | None = None,
             timeout: float = 600) -> tuple[dict[str, Any], dict[str, str]]:
  """Runs the command `argv` (its last argument added: a JSON list of the items to skip) until
  it finishes, in a new process each time one of its items kills it: returns ({item: result}
  of the items it finished, {item: why} of those that killed it). The command reports on its
  standard output, a JSON object a line, through `Reporter`: `trying` before an item's risky
  part (compiling, a first call), `tried` after it, `result` when the item is done."""
  results: dict[str, Any] = {}
  crashed: dict[str, str] = {}
  while True:
    done = subprocess.run([*argv, json.dumps([*results, *crashed])], env=env,
                          capture_output=True, text=True, timeout=timeout)
    trying = None
    for line in done.stdout.splitlines():
      try:
        message = json.loads(line)
      except ValueError:
        continue
      if not isinstance(message, dict):
        continue
      if "trying" in message:
        trying = message["trying"]
      elif "tried" in message:
        trying = None
      elif "result" in message:
        results[message["item"]] = message["result"]
        trying = None
    if done.returncode == 0:
      return results, crashed
    # Its last words: XLA's logged lines start with a level letter and a date (E1202 ...).
    words = [line for line in done.stderr.strip().splitlines()
             if line.strip() and not (line[:1] in "IWEF" and line[1:5].isdigit())]
    last = (words or ["no message"])[-1].strip()[:200]
    if trying is None or trying in crashed:  # Not a candidate's crash: the command's own bug.
      raise RuntimeError(f"{shlex.join(argv[:3])} failed (exit status {done.returncode}): "
                         f"{last}\n(outside any candidate: a bug; --kernels=xla skips the "
                         f"measurement) its standard error ends:\n{done.stderr[-3000:]}")
    code = done.returncode
    how = (f"killed the process ({signal.Signals(-code).name})" if code < 0
           and -code in signal.valid_signals() else f"ended the process (exit status {code})")
    crashed[trying] = f"{how}: {last}"


class Reporter:
  """The measuring process's side of `isolated`: which items to skip, and the reports."""

  def __init__(self, skip: str = "[]"):
    self.skip = set(json.loads(skip))

  @staticmethod
  def _say(**message: Any) -> None:
    print(json.dumps(message), flush=True)

  def trying(self, item: str) -> None:
    self._say(trying=item)

  def tried(self, item: str) -> None:
    self._say(tried=item)

  def result(self, item: str, result: Any) -> None:
    self._say(item=item, result=result)


def _xent(logits, labels):
  import jax
  import jax.numpy as jnp
  return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(labels.shape[0]), labels])


def _matmul(a, b):
  return a @ b


def _conv_loss(p, x, labels, matmul=_matmul):
  import jax
  import jax.numpy as jnp
  h = jax.lax.conv_general_dilated(x, p["conv"], (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  h = jax.lax.reduce_window(jax.nn.relu(h), -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1),
                            "VALID")
  h = jax.nn.relu(matmul(h.reshape(x.shape[0], -1), p["dense"]))
  return _xent(matmul(h, p["out"]), labels)


def _dense_loss(p, x, labels, matmul=_matmul):  # Lab 02's D(n): Dense, BatchNorm, ReLU.
  import jax
  for name in ("d0", "d1", "d2"):  # (No bias: the normalization cancels its gradient.)
    h = matmul(x, p[name])
    mean = h.mean(0)
    x = jax.nn.relu((h - mean) * jax.lax.rsqrt(((h - mean) ** 2).mean(0) + 1e-3))
  return _xent(matmul(x, p["out"]), labels)


def workload() -> dict[str, tuple[Callable, dict[str, Any], Any, Any]]:
  """The steps `choose` times, per kind: (loss, params, inputs, labels), as NumPy arrays, the
  same in every process. "conv": a 5x5 convolution, max pooling and two Dense layers at batch
  16 on 28x28x16 inputs; "dense": an MLP 784-512-128-512-10 with batch normalization at batch
  128; "conv_bf16" and "dense_bf16": the same with their dots in bf16
  (`jaxlab.models.mixed_matmul`)."""
  import functools
  import numpy as np
  from jaxlab.models import mixed_matmul
  rng = np.random.default_rng(0)
  normal = lambda scale, *shape: rng.normal(0, scale, shape).astype(np.float32)
  steps = {
      "conv": (_conv_loss, {"conv": normal(0.05, 5, 5, 16, 64),
                            "dense": normal(0.02, 14 * 14 * 64, 128),
                            "out": normal(0.05, 128, 10)},
               rng.random((16, 28, 28, 16), np.float32), rng.integers(0, 10, 16)),
      "dense": (_dense_loss, {"d0": normal(0.05, 784, 512), "d1": normal(0.05, 512, 128),
                              "d2": normal(0.05, 128, 512), "out": normal(0.05, 512, 10)},
                rng.random((128, 784), np.float32), rng.integers(0, 10, 128)),
  }
  for kind in ("conv", "dense"):
    loss, *rest = steps[kind]
    steps[f"{kind}_bf16"] = (functools.partial(loss, matmul=mixed_matmul), *rest)
  return steps


def _exact_loss(kind: str) -> Callable:
  """The float32 loss of a kind (its float64 run is the reference of both precisions)."""
  return _conv_loss if kind.startswith("conv") else _dense_loss


def _workload(out: str, repeats: int, skip: str = "[]") -> None:
  """The measurement (run by `measure` in its own process, through `isolated`: the kinds and
  the KIND/NAME candidates in `skip` are left out), of `workload`'s steps, forward and
  backward. Each candidate compiles them with its compiler options (`OPTIONS`); each of
  `repeats` rounds times every candidate once, in turn. Writes the float32 gradients and the
  same gradients in float64 (the reference every candidate is held to), and reports each kind's
  medians."""
  import jax
  jax.config.update("jax_enable_x64", True)  # Only for the reference: the rest is float32.
  import jax.numpy as jnp
  import numpy as np

  steps = workload()
  report = Reporter(skip)
  for kind, (loss, params, x, labels) in steps.items():
    if kind in report.skip:
      continue
    args = ({k: jnp.asarray(v) for k, v in params.items()}, jnp.asarray(x), jnp.asarray(labels))
    compiled, calls = {}, {}
    found: dict[str, Any] = {}
    for name in CANDIDATES:
      if f"{kind}/{name}" in report.skip:
        continue
      try:  # A candidate this jaxlib refuses is left out, never the measurement.
        step = jax.jit(jax.grad(loss), compiler_options=OPTIONS[name] or None)
        report.trying(f"{kind}/{name}")
        grads = jax.block_until_ready(step(*args))
        report.tried(f"{kind}/{name}")
        start = time.perf_counter()
        jax.block_until_ready(step(*args))
        calls[name] = max(1, math.ceil(SAMPLE_SECONDS / (time.perf_counter() - start)))
        compiled[name] = step
        np.savez(f"{out}/{kind}.{name}.npz", **{k: np.asarray(v) for k, v in grads.items()})
      except Exception as e:  # noqa: BLE001
        report.tried(f"{kind}/{name}")
        found[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
    times: dict[str, list[float]] = {name: [] for name in compiled}
    for _ in range(repeats):
      for name, step in compiled.items():
        start = time.perf_counter()
        for _ in range(calls[name]):
          jax.block_until_ready(step(*args))
        times[name].append((time.perf_counter() - start) / calls[name])
    median = lambda values: sorted(values)[len(values) // 2]
    for name, t in times.items():
      found[name] = {"seconds": median(t)}
      if "xla" in times:  # Paired by round: the machine's drift falls on both alike.
        found[name]["vs_xla"] = median([a / b for a, b in zip(t, times["xla"])])
    exact = jax.jit(jax.grad(_exact_loss(kind)))(
        {k: jnp.asarray(v, jnp.float64) for k, v in params.items()},
        jnp.asarray(x, jnp.float64), args[2])
    np.savez(f"{out}/{kind}.exact.npz", **{k: np.asarray(v) for k, v in exact.items()})
    report.result(kind, found)


def _error(path: pathlib.Path, exact: pathlib.Path) -> float:
  """The largest difference of a candidate's gradients from the float64 ones, relative to each
  array's scale."""
  import numpy as np
  with np.load(path) as found, np.load(exact) as want:
    return float(max(np.abs(found[k] - want[k]).max() / max(np.abs(want[k]).max(), 1e-30)
                     for k in want.files))


def _pick(candidates: dict[str, dict[str, Any]]) -> str:
  """Of candidates measured on one kind's step (each with `relative_error` to float64 and
  `vs_xla`, its median time per round over XLA's), the fastest by more than MARGIN over XLA as
  it comes whose error is within float rounding (no further from float64 than XLA's own: twice
  its error, at least RTOL); of those within MARGIN of the fastest, the first listed (the
  simplest). Marks each with `same_results`."""
  xla = candidates.get("xla", {})
  if "seconds" not in xla:
    return "xla"
  bound = max(RTOL, 2 * xla["relative_error"])
  for c in candidates.values():
    if "seconds" in c:
      c["same_results"] = c["relative_error"] <= bound
  usable = {n: c["vs_xla"] for n, c in candidates.items()
            if c.get("same_results") and c["vs_xla"] < 1 - MARGIN}
  if not usable:
    return "xla"
  fastest = min(usable.values())
  return next(n for n in usable if usable[n] <= fastest * (1 + MARGIN))


def _complete(record: Any) -> bool:
  return isinstance(record, dict) and all(
      record.get("kinds", {}).get(kind, {}).get("name") in KERNELS for kind in KINDS)


def choose(log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
           refresh: bool = False) -> dict[str, Any]:
  """This machine's kernels per kind of model: from the cache, or measured now (and cached).
  The record's `kinds` holds, per kind, the name, its flags, and every candidate's seconds,
  error against float64 and whether that is within float rounding."""
  key, path = machine_key(), cache_file()
  cached = read_json(path)
  if not refresh and _complete(cached.get(key)):
    return cached[key]
  log("measuring XLA:CPU's kernel libraries on this machine, once "
      f"({', '.join(CANDIDATES)}; steps of {' and '.join(KINDS)} models)")
  with tempfile.TemporaryDirectory() as tmp:
    measured = measure(pathlib.Path(tmp))  # A failure here is a bug: it keeps its traceback.
    for kind, candidates in measured.items():
      for name, c in candidates.items():
        if "seconds" in c:
          c["relative_error"] = _error(pathlib.Path(tmp) / f"{kind}.{name}.npz",
                                       pathlib.Path(tmp) / f"{kind}.exact.npz")
  kinds = {}
  for kind in KINDS:
    candidates = measured.get(kind, {})
    best = _pick(candidates)
    kinds[kind] = {"name": best, "xla_flags": KERNELS[best], "candidates": candidates}
    log(f"  {kind}: " + ", ".join(
        f"{n}: " + (f"{c['seconds'] * 1e3:.1f} ms"
                    + (f" ({c['vs_xla']:.2f} of xla's)" if "vs_xla" in c else "")
                    + ("" if c.get("same_results", True) else " (results off)")
                    if "seconds" in c else c["error"])
        for n, c in candidates.items()) + f" -> {best}")
  record = {"machine": key, "measured": time.strftime("%Y-%m-%dT%H:%M:%S"), "kinds": kinds,
            "bf16_vs_float32": _bf16_ratios(kinds)}
  log("  bf16 over float32, each with its kernels: " + ", ".join(
      f"{kind} {ratio:.2f}" for kind, ratio in record["bf16_vs_float32"].items()))
  cached[key] = record
  try:
    write_json(path, cached)
  except OSError as e:
    log(f"  (not cached: {e})")
  return record


def _bf16_ratios(kinds: dict[str, Any]) -> dict[str, float]:
  """Per kind of model, its bf16 step's time over its float32 step's, each under the kernels
  chosen for it: below 1, bf16 pays on this CPU."""
  ratios = {}
  for kind in ("conv", "dense"):
    seconds = [kinds[k]["candidates"].get(kinds[k]["name"], {}).get("seconds")
               for k in (kind, f"{kind}_bf16")]
    if all(seconds):
      ratios[kind] = seconds[1] / seconds[0]
  return ratios


def cached() -> dict[str, Any] | None:
  """This machine's record of `choose`, if it has been measured (nothing is measured here)."""
  record = read_json(cache_file()).get(machine_key())
  return record if _complete(record) else None


def bf16_notice(kind: str) -> str:
  """One line on what bf16 does for a `kind` of model ("conv" or "dense") on this CPU, from
  the kernels' measurement where it has been made (`choose`, once per machine): the ratio, and
  whether it pays (a `warning:` where it will not)."""
  ratio = (cached() or {}).get("bf16_vs_float32", {}).get(kind)
  where = f"{cpu()[0]}, jaxlib {importlib.metadata.version('jaxlib')}"
  if ratio is None:
    return (f"bf16 on this CPU ({where}): not measured yet (--kernels=auto measures it once, "
            "with the kernels)")
  if ratio < 1 - MARGIN:
    return (f"bf16 on this CPU ({where}): a {kind} step takes {ratio:.2f} of float32's time "
            "(dots in bfloat16, convolutions and the rest in float32)")
  return (f"warning: bf16 will not pay on this CPU ({where}): a {kind} step takes {ratio:.2f} of "
          "float32's time (measured once by jaxlab.training.kernels); training in bf16 as asked")


def measuring_environment() -> dict[str, str]:
  """The environment of a process that measures kernels: on the CPU, with the user's XLA flags
  but none of this module's (its compiler options alone decide)."""
  return {**os.environ, "XLA_FLAGS": _user_flags(), "JAX_PLATFORMS": "cpu"}


def _user_flags() -> str:
  """XLA_FLAGS without any kernel flags this module adds."""
  flags = os.environ.get("XLA_FLAGS", "").split()
  ours = {f for v in KERNELS.values() for f in v.split()}
  return " ".join(f for f in flags if f not in ours)


def _backend_started() -> bool:
  bridge = sys.modules.get("jax._src.xla_bridge")
  return bool(bridge and getattr(bridge, "_backends", None))


def apply(choice: str | None = None, started_with: str | None = None,
          kind: str | Callable[[], str] = "conv") -> str:
  """Sets XLA_FLAGS for the kernels of `choice` (default $JAXLAB_KERNELS, else "auto": this
  machine's measured choice for `kind` of model, a name of KINDS or a function that returns one,
  called only when the kinds' choices differ; "xla" where JAX may run on a GPU), unless
  `started_with` (a resumed run's) names them and `choice` is "auto". Returns the name applied.
  Once the backend has started its flags are fixed: then nothing changes, and the name is what
  it started with."""
  if _backend_started():
    return applied()
  choice = choice or os.environ.get(ENV) or "auto"
  if choice not in CHOICES:
    raise BadValue(f"unknown kernels {choice!r}; known: {', '.join(CHOICES)}")
  if choice == "auto":
    if started_with in KERNELS:
      choice = started_with
    elif gpu_possible():
      choice = "xla"
    else:
      kinds = choose()["kinds"]
      names = {kinds[k]["name"] for k in KINDS}
      if len(names) == 1:
        choice = names.pop()
      else:
        kind = kind() if callable(kind) else kind
        if kind not in KINDS:
          raise ValueError(f"unknown kind of model {kind!r}; known: {', '.join(KINDS)}")
        choice = kinds[kind]["name"]
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
  _workload(sys.argv[1], int(sys.argv[2]), *sys.argv[3:4])
