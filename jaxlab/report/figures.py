"""The report's figures, drawn with matplotlib's headless Agg backend into PNG files."""

from __future__ import annotations

import math
import pathlib
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # No display: files only.
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from jaxlab.report.runs import Group  # noqa: E402

DPI = 110


def curve(group: Group, key: str) -> tuple[np.ndarray, np.ndarray]:
  """(epochs, values of shape (seeds, epochs)) of `key` over the group's completed runs, cut
  to the epochs every run has."""
  histories = [r.history for r in group.completed if r.history]
  if not histories:
    return np.zeros(0), np.zeros((0, 0))
  length = min(len(h) for h in histories)
  values = np.array([[record.get(key, np.nan) for record in h[:length]] for h in histories],
                    dtype=float)
  return np.array([record["epoch"] for record in histories[0][:length]]), values


def _colors(n: int) -> list:
  cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
  return [cmap(i % cmap.N) for i in range(n)]


def _draw(ax, x: np.ndarray, values: np.ndarray, color, label: str, style: str = "-") -> None:
  """The mean over seeds as a line, and the range over seeds as a band where there are several."""
  ax.plot(x, values.mean(0), style, color=color, label=label, linewidth=1.6, marker=".")
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # Epochs are whole numbers.
  if len(values) > 1:
    ax.fill_between(x, values.min(0), values.max(0), color=color, alpha=0.18, linewidth=0)


def curves_figure(groups: Sequence[Group], key: str, title: str, ylabel: str,
                  path: pathlib.Path) -> pathlib.Path:
  """One line per experiment (mean over seeds, band: range over seeds) of `key` per epoch."""
  fig, ax = plt.subplots(figsize=(11, 6))
  for group, color in zip(groups, _colors(len(groups))):
    x, values = curve(group, key)
    if len(x):
      _draw(ax, x, values, color, f"{group.label} (n={len(values)})")
  ax.set_title(title)
  ax.set_xlabel("epoch")
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3)
  ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
  fig.tight_layout()
  fig.savefig(path, dpi=DPI)
  plt.close(fig)
  return path


def train_vs_validation_figure(groups: Sequence[Group], path: pathlib.Path) -> pathlib.Path:
  """Small multiples: train against validation accuracy per epoch, one panel per experiment."""
  cols = min(4, max(1, len(groups)))
  rows = math.ceil(len(groups) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False,
                           sharey=True)
  train_color, val_color = _colors(2)
  for ax, group in zip(axes.flat, groups):
    for key, color, name in (("train_accuracy", train_color, "train"),
                             ("val_accuracy", val_color, "validation")):
      x, values = curve(group, key)
      if len(x):
        _draw(ax, x, values, color, name)
    ax.set_title(group.label, fontsize=9)
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=8)
  for ax in list(axes.flat)[len(groups):]:
    ax.axis("off")
  axes.flat[0].legend(fontsize=8)
  fig.supxlabel("epoch")
  fig.supylabel("accuracy")
  fig.suptitle("Train and validation accuracy per epoch (mean over seeds; band: range)")
  fig.tight_layout()
  fig.savefig(path, dpi=DPI)
  plt.close(fig)
  return path


def confusion_figure(matrix: np.ndarray, class_names: Sequence[str], title: str,
                     path: pathlib.Path) -> pathlib.Path:
  """A confusion matrix heatmap (rows: true class, columns: predicted), counts in the cells."""
  k = len(class_names)
  fig, ax = plt.subplots(figsize=(7.5, 6.5))
  image = ax.imshow(matrix, cmap="Blues")
  fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
  ax.set_xticks(range(k), class_names, rotation=45, ha="right", fontsize=8)
  ax.set_yticks(range(k), class_names, fontsize=8)
  ax.set_xlabel("predicted class")
  ax.set_ylabel("true class")
  ax.set_title(title, fontsize=10)
  threshold = matrix.max() / 2 if matrix.size else 0
  integral = np.allclose(matrix, np.round(matrix))
  for i in range(k):
    for j in range(k):
      value = matrix[i, j]
      ax.text(j, i, f"{value:.0f}" if integral else f"{value:.1f}", ha="center", va="center",
              fontsize=7, color="white" if value > threshold else "black")
  fig.tight_layout()
  fig.savefig(path, dpi=DPI)
  plt.close(fig)
  return path


def samples_figure(images: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                   title: str, path: pathlib.Path, per_class: int = 8) -> pathlib.Path:
  """A grid of the first `per_class` images of every class, one row per class."""
  k = len(class_names)
  fig, axes = plt.subplots(k, per_class, figsize=(per_class * 0.9 + 1.6, k * 0.95),
                           squeeze=False)
  for c in range(k):
    picks = np.flatnonzero(labels == c)[:per_class]
    for j in range(per_class):
      ax = axes[c, j]
      ax.set_xticks([])
      ax.set_yticks([])
      for spine in ax.spines.values():
        spine.set_visible(False)
      if j < len(picks):
        image = images[picks[j]]
        gray = image.shape[-1] == 1
        ax.imshow(image[..., 0] if gray else image, cmap="gray" if gray else None, vmin=0,
                  vmax=255)
    axes[c, 0].set_ylabel(f"{c}: {class_names[c]}", rotation=0, ha="right", va="center",
                          fontsize=8)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=DPI)
  plt.close(fig)
  return path
