"""Model summaries: every submodule by path, its type, output shape and parameter count.

For the plan families the rows are Keras's layers, named and typed as `model.summary()` of
the same Keras model prints them (their parity is tested); for any other model, every
submodule (inside an NNX module seen through the bridge too) by its path, and every
parameter counted where its module holds it.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np

from jaxlab import models


def layer_output_shapes(model: nn.Module, image_shape: Sequence[int],
                        variables: Any = None) -> dict[str, tuple[int, ...]]:
  """Submodule path -> output shape of one example (`jaxlab.models.module_outputs`, shapes
  only). `variables` may be `abstract_variables(model, image_shape)` when the caller has it."""
  if variables is None:
    variables = models.abstract_variables(model, image_shape)
  with models.capturing(model, image_shape):
    captured = jax.eval_shape(lambda v, x: models.calls_of(model, v, x), variables,
                              models.example(image_shape))
  return {path: tuple(out.shape[1:])
          for path, out in models.in_order(captured, model, image_shape).items()}


def _count(tree: Any) -> int:
  return int(sum(np.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree)))


def _by_module(*collections: Any) -> dict[str, int]:
  """Module path -> how many values of `collections` (a variables tree each) it holds itself."""
  counts: dict[str, int] = {}
  for collection in collections:
    for path, leaf in jax.tree_util.tree_leaves_with_path(collection):
      module = "/".join(str(getattr(k, "key", k)) for k in path[:-1])
      counts[module] = counts.get(module, 0) + int(np.prod(leaf.shape))
  return counts


COUNTS = ("total_params", "trainable_params", "non_trainable_params")


def param_counts(model: nn.Module, image_shape: Sequence[int]) -> dict[str, int]:
  """The total, trainable and non-trainable parameter counts (Keras's three totals): the
  parameters, and every other collection (BatchNorm statistics)."""
  variables = models.abstract_variables(model, image_shape)
  trainable = _count(variables.get("params", {}))
  total = _count(variables)
  return {"total_params": total, "trainable_params": trainable,
          "non_trainable_params": total - trainable}


def summarize(model: nn.Module, image_shape: Sequence[int]) -> dict[str, Any]:
  """The summary as data: the JSON that `scripts/summary.py --json` prints. A row per submodule
  in the order its call finished (then any module that holds variables but is never called),
  with the parameters it holds itself: the rows add up to the totals."""
  variables = models.abstract_variables(model, image_shape)
  shapes = layer_output_shapes(model, image_shape, variables)
  types = models.module_types(model, image_shape)
  params = _by_module(variables.get("params", {}))
  others = _by_module(*(v for k, v in variables.items() if k != "params"))
  layers = []
  for path in [*shapes, *(p for p in {**params, **others} if p not in shapes)]:
    trainable, non_trainable = params.get(path, 0), others.get(path, 0)
    layers.append({
        "name": path or "(the model itself)",
        "type": types.get(path, type(model).__name__ if not path else "?"),
        "output_shape": [None, *shapes[path]] if path in shapes else None,
        "params": trainable + non_trainable,
        "trainable_params": trainable,
        "non_trainable_params": non_trainable,
    })
  return {"input_shape": [None, *models.input_shape(model, image_shape)], "layers": layers,
          **param_counts(model, image_shape)}


def forward_flops(model: nn.Module, image_shape: Sequence[int]) -> int:
  """Multiply-add FLOPs (2 per MAC) of one example's forward pass through the dots and
  convolutions (`jaxlab.models.flops_by_kind`), the work that dominates the cost; training
  costs about 3 times this."""
  return sum(models.flops_by_kind(model, image_shape).values())


def format_summary(summary: dict[str, Any], title: str = "") -> str:
  """The summary as a table in the layout of Keras's `model.summary()`."""
  def shape(s):
    return "(" + ", ".join("None" if d is None else str(d) for d in s) + ")"

  rows = [(f"{l['name']} ({l['type']})",
           shape(l["output_shape"]) if l["output_shape"] is not None else "-",
           f"{l['params']:,}") for l in summary["layers"]]
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
