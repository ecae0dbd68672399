"""Layer outputs by name, and their comparison: for tests that compare models layer by layer.

`capture` runs a model and returns every submodule's output by its path, as
`scripts/summary.py` names it, in model order (for the plan families, each Keras layer by its
Keras name; for any model, every submodule, inside an NNX module seen through the bridge too).
`compare` lines two captures (or a capture and a dict of reference arrays) up layer by layer;
`assert_layers_close` fails with the table, naming the first layer that diverges.

Errors are per layer: `max_abs` is max |a - b|; `max_rel` is max |a - b| / max |b|, the error
relative to the reference layer's scale (element-wise ratios explode where a ReLU output is 0).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlab import models


def capture(model: nn.Module, variables: Mapping[str, Any], x: Any, train: bool = False,
            rng: jax.Array | None = None, softmax_output: bool = False) -> dict[str, np.ndarray]:
  """Every submodule's output on batch `x`, by path, in model order (`jaxlab.models.
  module_outputs`, as one compiled program).

  `train=True` runs BatchNorm on batch statistics and Dropout with `rng` (the statistics
  updates are discarded). `softmax_output=True` reports the last output as probabilities, as a
  Keras model (whose last Dense has a softmax) computes it; jaxlab's output layer gives logits.
  """
  if train and rng is None:
    rng = jax.random.PRNGKey(0)
  x = jnp.asarray(x, jnp.float32)
  with models.capturing(model, x.shape[1:]):
    found = _intermediates(model, dict(variables), x, train, rng)
  out = {name: np.asarray(value)
         for name, value in models.in_order(found, model, x.shape[1:]).items()}
  if softmax_output:
    last = list(out)[-1]
    out[last] = np.asarray(jax.nn.softmax(out[last].astype(np.float32), axis=-1))
  return out


@functools.partial(jax.jit, static_argnums=(0, 3))
def _intermediates(model: nn.Module, variables: dict[str, Any], x: jax.Array, train: bool,
                   rng: jax.Array | None) -> dict[str, Any]:
  """Every submodule's output, as one compiled program (op by op, a deep model compiles each
  operation of each shape on its own)."""
  return models.calls_of(model, variables, x, train, {"dropout": rng} if train else {})


@dataclasses.dataclass(frozen=True)
class LayerDiff:
  name: str
  shape: tuple[int, ...] | None
  reference_shape: tuple[int, ...] | None
  max_abs: float
  max_rel: float

  @property
  def shapes_match(self) -> bool:
    return self.shape == self.reference_shape


@dataclasses.dataclass(frozen=True)
class Comparison:
  """Per-layer differences between a capture and a reference, in the capture's order."""

  layers: tuple[LayerDiff, ...]
  rtol: float

  def first_divergence(self) -> LayerDiff | None:
    for layer in self.layers:
      if not layer.shapes_match or not layer.max_rel <= self.rtol:
        return layer
    return None

  @property
  def ok(self) -> bool:
    return self.first_divergence() is None

  def table(self) -> str:
    first = self.first_divergence()
    width = max([len(l.name) for l in self.layers] + [5]) + 2
    lines = [f"{'layer':<{width}}{'shape':<22}{'max abs err':>14}{'max rel err':>14}"]
    for l in self.layers:
      shape = str(l.shape) if l.shapes_match else f"{l.shape} vs {l.reference_shape}"
      mark = "  <- first divergence" if l is first else ""
      lines.append(f"{l.name:<{width}}{shape:<22}{l.max_abs:>14.3e}{l.max_rel:>14.3e}{mark}")
    verdict = (f"all {len(self.layers)} layers within max rel err {self.rtol:g}" if first is None
               else f"layer {first.name!r} diverges (max rel err {first.max_rel:.3e} > "
                    f"{self.rtol:g})" if first.shapes_match
               else f"layer {first.name!r} has shape {first.shape}, reference "
                    f"{first.reference_shape}")
    return "\n".join(lines + [verdict])


def _diff(name: str, a: Any, b: Any) -> LayerDiff:
  if a is None or b is None:
    return LayerDiff(name, None if a is None else np.shape(a), None if b is None else np.shape(b),
                     float("inf"), float("inf"))
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  if a.shape != b.shape:
    return LayerDiff(name, a.shape, b.shape, float("inf"), float("inf"))
  err = np.abs(a - b)
  max_abs = float(err.max()) if err.size else 0.0
  scale = float(np.abs(b).max()) if b.size else 0.0
  max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
  if not np.all(np.isfinite(a)) or not np.all(np.isfinite(b)):
    max_abs = max_rel = float("nan")
  return LayerDiff(name, a.shape, b.shape, max_abs, max_rel)


def compare(capture_: Mapping[str, Any], reference: Mapping[str, Any],
            rtol: float = 1e-5) -> Comparison:
  """Lines `capture_` up with `reference` by layer name (a layer missing on either side is a
  divergence); rows follow the capture's order, then reference-only names."""
  names = list(capture_) + [n for n in reference if n not in capture_]
  return Comparison(tuple(_diff(n, capture_.get(n), reference.get(n)) for n in names), rtol)


def assert_layers_close(capture_: Mapping[str, Any], reference: Mapping[str, Any],
                        rtol: float = 1e-5) -> Comparison:
  """Fails (AssertionError with the per-layer table) unless every layer is within `rtol`."""
  result = compare(capture_, reference, rtol)
  if not result.ok:
    raise AssertionError("layer outputs differ:\n" + result.table())
  return result
