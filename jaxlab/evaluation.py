"""Evaluation reports: accuracy, the confusion matrix and per-class accuracy on a split."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


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
