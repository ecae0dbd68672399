"""The metrics a run computes: each said once, as a per-example function of logits and labels.

A metric is `fn(logits, labels)`, logits (N, classes) and integer labels (N,), returning one
value per example (N,); its value over an epoch (or a split) is the mean of those values over
its examples. The steps keep each metric's sum and one count of examples, so chunks of steps,
devices, the members of a group and a resumed epoch all reduce it the same way (they add).

  BUILTIN         loss (cross-entropy, the data loss) and accuracy: every run's
  table(own)      BUILTIN and an experiment's own (`Experiment(metrics={"name": fn})`)

What derives from the table: the sums of the train and eval steps (`sums`), the epoch's
records (`epoch_means`: `train_<name>` and `val_<name>` in metrics.jsonl), the TensorBoard tags
(`jaxlab.training.hooks`), the summary's `final_val_<name>`, and what config.json records of each metric
(its direction, `describe`), from which the report answers a question on any of them.

A split's evaluation report (`report`): accuracy, the confusion matrix and each class's
accuracy, from the predictions, beside the metrics' means.

The train record's `loss` is Keras's: the data loss plus the L2 term (`l2_loss`), with the data
loss alone as `data_loss`; validation has no L2 term. The best checkpoint is chosen on
validation accuracy (`jaxlab.rundir.run.BEST_ON`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlab.errors import BadValue


@dataclasses.dataclass(frozen=True)
class Metric:
  """`fn(logits, labels)` -> one value per example, averaged over the examples seen;
  `higher_is_better` says which way is better (the report's wording, a question's direction)."""

  fn: Callable[[jax.Array, jax.Array], jax.Array]
  higher_is_better: bool = True


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Softmax cross-entropy of each example: the data loss, and what training minimizes."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """1 where the class of the largest logit is the label, else 0."""
  return (jnp.argmax(logits, -1) == labels).astype(jnp.float32)


BUILTIN: dict[str, Metric] = {"loss": Metric(cross_entropy, higher_is_better=False),
                              "accuracy": Metric(accuracy)}

# The steps' other sums: not metrics, so no metric may take their names.
COUNT = "count"  # Examples the metric sums are over.
L2 = "l2_loss"  # The L2 term of the train loss, summed per example (as Keras weighs it).
NONFINITE = "nonfinite"  # Train steps whose loss, gradient or new state was not finite.
FIRST_NONFINITE = "first_nonfinite"  # The first of them (NO_STEP where there was none).
NO_STEP = np.iinfo(np.int32).max
RESERVED = (COUNT, L2, NONFINITE, FIRST_NONFINITE, "data_loss", "skipped_steps",
            "learning_rate")

Table = tuple[tuple[str, Metric], ...]  # (name, metric) in order: hashable, as a step's key.


def table(own: Mapping[str, Callable | Metric] | None = None) -> Table:
  """BUILTIN, then `own` (an experiment's metrics: a function, or a `Metric` to say that
  lower is better), each name checked."""
  found = dict(BUILTIN)
  for name, metric in (own or {}).items():
    if not (isinstance(name, str) and name.isidentifier()):
      raise BadValue(f"metric name {name!r} must be a Python identifier (it becomes "
                     f"train_<name> and val_<name>)")
    if name in found or name in RESERVED:
      raise BadValue(f"metric name {name!r} is taken (by jaxlab's own "
                     f"{'metric' if name in found else 'records'}); choose another name")
    if not isinstance(metric, Metric):
      if not callable(metric):
        raise BadValue(f"metric {name!r} must be a function fn(logits, labels) or a "
                       f"jaxlab.metrics.Metric, got {metric!r}")
      metric = Metric(metric)
    found[name] = metric
  return tuple(found.items())


def names(metrics: Table) -> tuple[str, ...]:
  return tuple(name for name, _ in metrics)


def describe(metrics: Table) -> dict[str, dict[str, Any]]:
  """What config.json records of each metric (read by the report, which runs no metric)."""
  return {name: {"higher_is_better": m.higher_is_better} for name, m in metrics}


# ----------------------------------------------------------------------------- on the device


def sums(metrics: Table, logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
  """Each metric's sum over the batch (float32), and the batch's example count."""
  out = {}
  for name, metric in metrics:
    values = metric.fn(logits, labels)
    if jnp.shape(values) != labels.shape:
      raise BadValue(f"metric {name!r} returned shape {jnp.shape(values)} for a batch of "
                     f"{labels.shape[0]} examples; a metric returns one value per example")
    out[name] = jnp.sum(jnp.asarray(values, jnp.float32))
  out[COUNT] = jnp.asarray(labels.shape[0], jnp.int32)
  return out


def add(a: Mapping[str, Any], b: Mapping[str, Any],
        minimum: Callable[[Any, Any], Any] = jnp.minimum) -> dict[str, Any]:
  """The sums of two spans of steps: sums and counts add, the first bad step is the least.
  Arrays in a compiled step; Python numbers on the host with `minimum=min`."""
  return {k: minimum(a[k], b[k]) if k == FIRST_NONFINITE else a[k] + b[k] for k in a}


# ----------------------------------------------------------------------------- on the host


def eval_zeros(metrics: Table) -> dict[str, float | int]:
  """The sums of no example, as Python numbers: each metric's, and the count."""
  return {**{name: 0.0 for name, _ in metrics}, COUNT: 0}


def train_zeros(metrics: Table) -> dict[str, float | int]:
  """The sums of no train step: the eval sums, the L2 term and the non-finite bookkeeping."""
  return {**eval_zeros(metrics), L2: 0.0, NONFINITE: 0, FIRST_NONFINITE: int(NO_STEP)}


def restore_sums(metrics: Table, saved: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
  """The train sums of an unfinished epoch as a checkpoint saved them, for `metrics` now, and
  the metrics it lacks: a metric added since it was written has no sum for the steps before
  it (NaN, so the epoch's mean of it is left out) unless no step was done; one removed since
  is dropped."""
  found = train_zeros(metrics)
  saved = {k: v.item() if hasattr(v, "item") else v for k, v in saved.items()}
  missing = [name for name, _ in metrics if name not in saved]
  for key in found:
    if key in saved:
      found[key] = saved[key]
    elif key in missing and saved.get(COUNT):
      found[key] = math.nan
  return found, missing if saved.get(COUNT) else []


def means(totals: Mapping[str, Any]) -> dict[str, float | None]:
  """Each metric's mean from sums (`eval_zeros`'s keys): None where no example was counted or
  the sum is unknown (NaN)."""
  count = totals[COUNT]
  return {k: (v / count if count and not math.isnan(v) else None)
          for k, v in totals.items() if k not in (COUNT, L2, NONFINITE, FIRST_NONFINITE)}


def epoch_means(totals: Mapping[str, Any]) -> dict[str, Any]:
  """A train epoch's record from its sums: `loss` is the data loss plus the L2 term (Keras's),
  `data_loss` and `l2_loss` its parts, then every other metric, and the skipped steps."""
  found = means(totals)
  count, data_loss = totals[COUNT], found.pop("loss")
  mean = (lambda x: x / count) if count else (lambda x: None)
  return {"loss": None if data_loss is None else mean(totals["loss"] + totals[L2]),
          "data_loss": data_loss, "l2_loss": mean(totals[L2]), **found,
          "skipped_steps": totals[NONFINITE]}


# ----------------------------------------------------------------------------- evaluation reports


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
  """Counts (num_classes, num_classes): row = true class, column = predicted class."""
  labels = np.asarray(labels, np.int64)
  predictions = np.asarray(predictions, np.int64)
  if labels.shape != predictions.shape:
    raise ValueError(f"{labels.shape[0]} labels but {predictions.shape[0]} predictions")
  flat = labels * num_classes + predictions
  return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def report(labels: np.ndarray, predictions: np.ndarray, class_names: Sequence[str],
           loss: float | None = None) -> dict[str, Any]:
  """JSON-ready report: accuracy, confusion matrix and accuracy per class (None if unseen)."""
  matrix = confusion_matrix(labels, predictions, len(class_names))
  support = matrix.sum(1)
  per_class = {name: (float(matrix[i, i] / support[i]) if support[i] else None)
               for i, name in enumerate(class_names)}
  out = {"examples": int(matrix.sum()), "accuracy": float(np.trace(matrix) / matrix.sum()),
         "confusion_matrix": matrix.tolist(), "per_class_accuracy": per_class}
  if loss is not None:
    out["loss"] = loss
  return out


def format_confusion(report: dict[str, Any], class_names: Sequence[str]) -> str:
  """The confusion matrix as a table with class names (rows true, columns predicted)."""
  matrix = np.asarray(report["confusion_matrix"])
  width = max(6, len(str(matrix.max())) + 1)
  label_width = max(len(n) for n in class_names) + 2
  lines = ["rows: true class; columns: predicted class (index)",
           " " * label_width + "".join(f"{i:>{width}}" for i in range(len(class_names)))
           + f"{'accuracy':>10}"]
  for i, name in enumerate(class_names):
    acc = report["per_class_accuracy"][name]
    lines.append(f"{i} {name}".ljust(label_width) + "".join(f"{v:>{width}}" for v in matrix[i])
                 + (f"{acc:>10.4f}" if acc is not None else f"{'-':>10}"))
  lines.append(f"accuracy {report['accuracy']:.4f} on {report['examples']} examples")
  return "\n".join(lines)
