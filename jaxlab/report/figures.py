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


# One colour, line style and marker per experiment, the same in every figure: ten colours, then
# the same ten dashed, then dotted; markers cycle with another period, so no two of the first
# thirty experiments look alike.
_LINESTYLES = ("-", "--", ":")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def styles(labels: Sequence[str]) -> dict[str, dict]:
  """Each label's (experiment's) colour, line style and marker, by its place in `labels` (the
  report's order), so that a label looks the same in every figure of a report."""
  cmap = plt.get_cmap("tab10")
  return {label: {"color": cmap(i % 10), "linestyle": _LINESTYLES[(i // 10) % 3],
                  "marker": _MARKERS[i % len(_MARKERS)]} for i, label in enumerate(labels)}


def _draw(ax, x: np.ndarray, values: np.ndarray, style: dict, label: str) -> None:
  """The mean over seeds as a line, and the range over seeds as a band where there are several."""
  ax.plot(x, values.mean(0), label=label, linewidth=1.5, markersize=3.5, **style)
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # Epochs are whole numbers.
  if len(values) > 1:
    ax.fill_between(x, values.min(0), values.max(0), color=style["color"], alpha=0.15,
                    linewidth=0)


def _save(fig, path: pathlib.Path, tight: bool = False) -> pathlib.Path:
  """Writes the figure; `tight` crops it to what is drawn (a legend outside the axes), at the
  cost of another layout pass, which a figure laid out by tight_layout does not need."""
  fig.savefig(path, dpi=DPI, **({"bbox_inches": "tight"} if tight else {}))
  plt.close(fig)
  return path


def zoom_limits(groups: Sequence[Group], key: str, labels: Sequence[str]
                ) -> tuple[float, float] | None:
  """The y range of `labels`' mean curves of `key` from a quarter of the way in, with a margin:
  where most curves lie once the first epochs are past."""
  values = []
  for group in groups:
    if group.label in labels:
      _, v = curve(group, key)
      if v.size:
        values.append(v.mean(0)[v.shape[1] // 4:])
  if not values:
    return None
  low, high = float(np.nanmin(np.concatenate(values))), float(np.nanmax(np.concatenate(values)))
  margin = max(0.1 * (high - low), 0.002)
  return low - margin, high + margin


def curves_figure(groups: Sequence[Group], key: str, title: str, ylabel: str,
                  path: pathlib.Path, style: dict[str, dict], log: bool = False,
                  zoom: Sequence[str] = ()) -> pathlib.Path:
  """One line per experiment (mean over seeds, band: range over seeds) of `key` per epoch; with
  `zoom`, a second panel of those experiments alone, on the range where they lie."""
  panels = 2 if zoom else 1
  fig, axes = plt.subplots(1, panels, figsize=(7.5 * panels + 2.5, 6), squeeze=False)
  for i, ax in enumerate(axes.flat):
    for group in groups:
      if i == 1 and group.label not in zoom:
        continue
      x, values = curve(group, key)
      if len(x):
        _draw(ax, x, values, style[group.label], f"{group.label} (n={len(values)})")
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    if log:
      ax.set_yscale("log")
  axes[0, 0].set_title("all experiments" + (" (log scale)" if log else ""), fontsize=10)
  if zoom:
    limits = zoom_limits(groups, key, zoom)
    if limits:
      axes[0, 1].set_ylim(*limits)
    axes[0, 1].set_title(f"zoom: the {len(zoom)} experiments within 10 points of the median "
                         "final accuracy", fontsize=10)
  axes[0, -1].legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
  fig.suptitle(title)
  return _save(fig, path, tight=True)


def train_vs_validation_figure(groups: Sequence[Group], path: pathlib.Path,
                               style: dict[str, dict]) -> pathlib.Path:
  """Small multiples: train against validation accuracy per epoch, one panel per experiment,
  each on its own y axis (the gaps between the two are a few points), the final gap in the
  title."""
  cols = min(4, max(1, len(groups)))
  rows = math.ceil(len(groups) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.8 * cols, 2.9 * rows), squeeze=False)
  for ax, group in zip(axes.flat, groups):
    color = style[group.label]["color"]
    finals = {}
    for key, linestyle, name in (("train_accuracy", "-", "train"),
                                 ("val_accuracy", "--", "validation")):
      x, values = curve(group, key)
      if len(x):
        _draw(ax, x, values, {"color": color, "linestyle": linestyle, "marker": None}, name)
        finals[key] = values.mean(0)[-1]
    gap = (f"\ngap at the end {100 * (finals['train_accuracy'] - finals['val_accuracy']):+.1f} "
           "points" if len(finals) == 2 else "")
    ax.set_title(group.label + gap, fontsize=8.5)
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=7.5)
  for ax in list(axes.flat)[len(groups):]:
    ax.axis("off")
  axes.flat[0].legend(fontsize=7.5)
  fig.supxlabel("epoch")
  fig.supylabel("accuracy (each panel on its own scale)")
  fig.suptitle("Train (solid) and validation (dashed) accuracy per epoch (mean over seeds; "
               "band: range)")
  fig.tight_layout()
  return _save(fig, path)


def forest_figure(rows: Sequence[dict], style: dict[str, dict], path: pathlib.Path,
                  zoom: Sequence[str] = ()) -> pathlib.Path:
  """Final validation accuracy per experiment: each seed a dot, the mean a bar, its 95% t
  interval a line; the baseline's mean a dashed vertical line. With `zoom`, a second panel of
  those experiments alone."""
  shown = [r for r in rows if r["final_val_accuracy"]["n"]]
  shown.sort(key=lambda r: r["final_val_accuracy"]["mean"])
  panels = 2 if zoom else 1
  fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels + 1.5, 0.42 * len(shown) + 1.6),
                           squeeze=False, sharey=True)
  base = rows[0]["final_val_accuracy"]["mean"] if rows else None
  for p, ax in enumerate(axes.flat):
    for y, row in enumerate(shown):
      if p == 1 and row["label"] not in zoom:
        continue
      stats, color = row["final_val_accuracy"], style[row["label"]]["color"]
      if stats.get("ci95"):
        ax.plot(stats["ci95"], [y, y], color=color, linewidth=2, alpha=0.6)
      ax.plot([stats["mean"]] * 2, [y - 0.3, y + 0.3], color=color, linewidth=2.5)
      seeds = list(stats["per_seed"].values())
      ax.scatter(seeds, [y] * len(seeds), color=color, s=18, zorder=3, edgecolor="white",
                 linewidth=0.5)
    if base is not None:
      ax.axvline(base, color="0.4", linestyle="--", linewidth=1)
    ax.grid(alpha=0.3, axis="x")
    ax.set_xlabel("final validation accuracy")
  axes[0, 0].set_yticks(range(len(shown)), [r["label"] for r in shown], fontsize=8.5)
  axes[0, 0].set_ylim(-0.7, len(shown) - 0.3)
  axes[0, 0].set_xlim(max(0.0, axes[0, 0].get_xlim()[0]), min(1.0, axes[0, 0].get_xlim()[1]))
  axes[0, 0].set_title("all experiments", fontsize=10)
  if zoom:
    values = [v for r in shown if r["label"] in zoom
              for v in [*r["final_val_accuracy"]["per_seed"].values(),
                        *(r["final_val_accuracy"].get("ci95") or [])]]
    low, high = min(values), max(values)
    margin = max(0.05 * (high - low), 0.002)
    axes[0, 1].set_xlim(low - margin, high + margin)
    axes[0, 1].set_title("zoom: within 10 points of the median", fontsize=10)
  fig.suptitle("Final validation accuracy: seeds (dots), mean (bar), 95% t interval (line); "
               f"dashed: {rows[0]['label'] if rows else ''}", fontsize=10)
  fig.tight_layout()
  return _save(fig, path)


def confusion_figure(matrices: Sequence[np.ndarray], class_names: Sequence[str], title: str,
                     path: pathlib.Path, subtitles: Sequence[str] = ("",)) -> pathlib.Path:
  """Confusion matrices normalized by row (the share of each true class predicted as each
  class), one panel each: the off-diagonal errors on the colour scale, the diagonal (each
  class's accuracy) in grey, out of it, so that the errors that matter are not washed out."""
  k = len(class_names)
  n = len(matrices)
  fig, axes = plt.subplots(1, n, figsize=(6.8 * n, 6.2), squeeze=False)
  for ax, matrix, subtitle in zip(axes.flat, matrices, subtitles):
    matrix = np.asarray(matrix, float)
    share = matrix / np.maximum(matrix.sum(1, keepdims=True), 1e-12)
    errors = np.where(np.eye(k, dtype=bool), np.nan, share)
    top = float(np.nanmax(errors)) if np.isfinite(errors).any() else 1.0
    image = ax.imshow(100 * errors, cmap="Reds", vmin=0, vmax=100 * max(top, 1e-6))
    ax.imshow(np.where(np.eye(k, dtype=bool), 1.0, np.nan), cmap="Greys", vmin=0, vmax=4)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="% of the true class")
    ax.set_xticks(range(k), class_names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), class_names, fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(subtitle, fontsize=9)
    for i in range(k):
      for j in range(k):
        value = share[i, j]
        if i == j or value >= 0.005:
          ax.text(j, i, f"{100 * value:.0f}", ha="center", va="center", fontsize=7,
                  color="white" if i != j and value > top / 2 else "black")
  fig.suptitle(title + "\n(% of each true class; diagonal: the class's accuracy, in grey, "
               "off the colour scale)", fontsize=10)
  fig.tight_layout()
  return _save(fig, path, tight=True)  # tight_layout leaves the suptitle's second line out.


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
