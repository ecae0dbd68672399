"""Keras-style model summaries: each layer's name, type, output shape and parameter count."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.models import PlanModel, iter_ops


def abstract_variables(model: PlanModel) -> dict[str, Any]:
  """The model's variables as shapes only (`jax.eval_shape`): no memory, no compute."""
  x = jnp.zeros((1,) + model.input_shape(), jnp.float32)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), x)


def layer_output_shapes(model: PlanModel, variables: Any = None) -> dict[str, tuple[int, ...]]:
  """Layer name -> output shape of one example, from the captured intermediates.

  `variables` may be `abstract_variables(model)` when the caller has it already."""
  x = jax.ShapeDtypeStruct((1,) + model.input_shape(), jnp.float32)
  if variables is None:
    variables = abstract_variables(model)

  def run(v, x):
    _, state = model.apply(v, x, capture_intermediates=True, mutable=["intermediates"])
    return state["intermediates"]

  captured = jax.eval_shape(run, variables, x)
  # A layer's entry holds every call made inside it; the last one is the layer's output.
  return {name: tuple(calls["__call__"][-1].shape[1:])
          for name, calls in captured.items() if name != "__call__"}


def _count(tree: Any) -> int:
  return int(sum(np.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree)))


COUNTS = ("total_params", "trainable_params", "non_trainable_params")


def param_counts(model: PlanModel) -> dict[str, int]:
  """The total, trainable and non-trainable parameter counts (Keras's three totals)."""
  summary = summarize(model)
  return {k: summary[k] for k in COUNTS}


def summarize(model: PlanModel) -> dict[str, Any]:
  """The summary as data: the JSON that `scripts/summary.py --json` prints."""
  variables = abstract_variables(model)
  params = variables.get("params", {})
  stats = variables.get("batch_stats", {})
  shapes = layer_output_shapes(model, variables)
  layers = []
  for op in iter_ops(model.plan()):
    trainable, non_trainable = _count(params.get(op.name, {})), _count(stats.get(op.name, {}))
    layers.append({
        "name": op.name,
        "type": op.keras_type,
        "output_shape": [None, *shapes[op.name]],
        "params": trainable + non_trainable,
        "trainable_params": trainable,
        "non_trainable_params": non_trainable,
    })
  trainable, non_trainable = _count(params), _count(stats)
  return {
      "input_shape": [None, *model.input_shape()],
      "layers": layers,
      "total_params": trainable + non_trainable,
      "trainable_params": trainable,
      "non_trainable_params": non_trainable,
  }


def forward_flops_by_kind(model: PlanModel) -> dict[str, int]:
  """Multiply-add FLOPs (2 per MAC) of one example's forward pass through the Dense and the
  Conv2D layers: {"dense": ..., "conv2d": ...}."""
  variables = abstract_variables(model)
  shapes = layer_output_shapes(model, variables)
  params = variables["params"]
  totals = {"dense": 0, "conv2d": 0}
  for op in iter_ops(model.plan()):
    if op.kind in totals:
      kernel = params[op.name]["kernel"].shape
      positions = int(np.prod(shapes[op.name][:-1]))  # 1 for Dense, H*W for Conv2D.
      totals[op.kind] += 2 * int(np.prod(kernel)) * positions
  return totals


def forward_flops(model: PlanModel) -> int:
  """Multiply-add FLOPs (2 per MAC) of one example's forward pass through the Dense and Conv2D
  layers, the layers that dominate the cost; training costs about 3 times this."""
  return sum(forward_flops_by_kind(model).values())


def format_summary(summary: dict[str, Any], title: str = "") -> str:
  """The summary as a table in the layout of Keras's `model.summary()`."""
  def shape(s):
    return "(" + ", ".join("None" if d is None else str(d) for d in s) + ")"

  rows = [(f"{l['name']} ({l['type']})", shape(l["output_shape"]), f"{l['params']:,}")
          for l in summary["layers"]]
  header = ("Layer (type)", "Output Shape", "Param #")
  widths = [max(len(r[i]) for r in rows + [header]) + 2 for i in range(3)]
  line = lambda r: "".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
  rule = "=" * sum(widths)
  out = [f'Model: "{title}"'] if title else []
  out += [rule, line(header), rule]
  out += [line(r) for r in rows]
  out += [rule,
          f"Total params: {summary['total_params']:,}",
          f"Trainable params: {summary['trainable_params']:,}",
          f"Non-trainable params: {summary['non_trainable_params']:,}",
          rule]
  return "\n".join(out)
