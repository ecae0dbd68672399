"""The lab report: tables over seeds, curves, confusion matrices, as Markdown, HTML and JSON.

Built from run directories alone: a results table over seeds, curves, confusion matrices and
sample images, as Markdown, a self-contained HTML page and JSON.
"""

from __future__ import annotations

import datetime
import pathlib
import re
import statistics
from typing import Any

import numpy as np

from jaxlab import data
from jaxlab.metrics import write_json
from jaxlab.report import figures, render
from jaxlab.report.runs import Collection, Group, find_runs
from jaxlab.report.stats import seed_figure, spread, welch_p_value

TOP = 5  # Experiments in the "top five" figures.
CONFUSED_PAIRS = 3  # Most confused pairs listed per experiment.


def _class_names(dataset: str, size: int) -> list[str]:
  if dataset in data.DATASETS and data.DATASETS.get(dataset).num_classes == size:
    return list(data.DATASETS.get(dataset).class_names)
  return [str(i) for i in range(size)]


def _confusion(group: Group) -> dict[str, Any] | None:
  """The mean over seeds of the final checkpoint's confusion matrix, and its most confused
  pairs (true class, predicted class) by mean count."""
  matrices = [np.asarray(r.summary["evaluation"]["final"]["confusion_matrix"], float)
              for r in group.completed]
  if not matrices:
    return None
  matrix = np.mean(matrices, axis=0)
  names = _class_names(group.dataset, len(matrix))
  support = matrix.sum(1)
  pairs = sorted(((matrix[i, j], i, j) for i in range(len(matrix)) for j in range(len(matrix))
                  if i != j and matrix[i, j] > 0), reverse=True)[:CONFUSED_PAIRS]
  return {"matrix": matrix.tolist(), "class_names": names, "seeds": len(matrices),
          "most_confused": [{"true": names[i], "predicted": names[j], "count": float(c),
                             "fraction_of_true": float(c / support[i]) if support[i] else None}
                            for c, i, j in pairs]}


def experiment_rows(collection: Collection) -> list[dict[str, Any]]:
  """One row per group: the table's numbers, as data (report.json's `experiments`)."""
  groups = collection.groups
  baseline = groups[0] if groups else None
  base_final = [r.summary["final_val_accuracy"] for r in baseline.completed] if baseline else []
  rows = []
  for group in groups:
    done = group.completed
    seeds = [r.seed for r in done]
    final = [r.summary["final_val_accuracy"] for r in done]
    best = [r.summary["best_val_accuracy"] for r in done]
    summaries = [r.summary for r in group.runs if r.summary]
    about = group.about
    figure = seed_figure(about.get("seed_accuracy", ""))
    final_stats, best_stats = spread(final, seeds), spread(best, seeds)
    same_data = bool(about.get("seed_dataset")) and about.get("seed_dataset") == group.dataset
    difference = {key: (stats["mean"] - figure[key]
                        if same_data and stats["mean"] is not None and figure[key] is not None
                        else None)
                  for key, stats in (("final", final_stats), ("best", best_stats))}
    seconds = [r.summary["median_epoch_seconds"] for r in done
               if r.summary.get("median_epoch_seconds") is not None]
    rows.append({
        "experiment": group.experiment, "label": group.label, "dataset": group.dataset,
        "lab": about.get("lab", ""),
        "params": summaries[0].get("total_params") if summaries else None,
        "epochs": next((r.epochs for r in group.runs if r.epochs), None),
        "seconds_per_epoch": statistics.median(seconds) if seconds else None,
        "seeds": seeds, "runs": [r.path for r in group.runs],
        "not_completed": [{"path": r.path, "status": r.status, "note": r.note()}
                          for r in group.runs if r.status != "completed"],
        "final_val_accuracy": final_stats, "best_val_accuracy": best_stats,
        "seed_report": {"figure": about.get("seed_accuracy", ""), **figure,
                        "dataset": about.get("seed_dataset", ""),
                        "section": about.get("report", "")},
        "difference_vs_seed": difference,
        "p_value_vs_baseline": (welch_p_value(final, base_final)
                                if group is not baseline else None),
        "confusion": _confusion(group),
    })
  return rows


def _mean_std(stats: dict[str, Any]) -> str:
  if stats["mean"] is None:
    return "— (n=0)"
  if stats["std"] is None:
    return f"{stats['mean']:.4f} (n={stats['n']})"
  return f"{stats['mean']:.4f} ± {stats['std']:.4f} (n={stats['n']})"


def _signed(value: float | None) -> str:
  return "—" if value is None else f"{value:+.4f}"


def table_rows(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
  """The results table's header and cells."""
  baseline = rows[0]["label"] if rows else ""
  header = ["experiment", "data set", "params", "epochs", "s/epoch",
            "final val acc (mean ± std)", "best val acc (mean ± std)", "report (its data set)",
            "Δ final / best vs report", f"p vs {baseline} (final)"]
  cells = []
  for i, row in enumerate(rows):
    seed = row["seed_report"]
    difference = row["difference_vs_seed"]
    if seed["figure"] and (difference["final"] is not None or difference["best"] is not None):
      delta = f"{_signed(difference['final'])} / {_signed(difference['best'])}"
    elif seed["figure"] and seed["dataset"] and seed["dataset"] != row["dataset"]:
      delta = f"n/a: {seed['dataset']}"
    else:
      delta = "—"
    p = row["p_value_vs_baseline"]
    cells.append([
        row["label"], row["dataset"],
        f"{row['params']:,}" if row["params"] is not None else "—",
        str(row["epochs"] or "—"),
        f"{row['seconds_per_epoch']:.2f}" if row["seconds_per_epoch"] is not None else "—",
        _mean_std(row["final_val_accuracy"]), _mean_std(row["best_val_accuracy"]),
        f"{seed['figure']} ({seed['dataset']})" if seed["figure"] else "—",
        delta,
        "baseline" if i == 0 else (f"{p:.3g}" if p is not None else "—"),
    ])
  return header, cells


def results_table(runs_dir: str | pathlib.Path) -> str:
  """The results table of every run under `runs_dir`, as Markdown (for a terminal)."""
  header, cells = table_rows(experiment_rows(find_runs(runs_dir)))
  return render.markdown([render.Table(header, cells)])


def _slug(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def _sample_images(collection: Collection, out: pathlib.Path) -> list[dict[str, Any]]:
  """A grid of sample images per data set of the runs, read where the runs read their data."""
  samples = []
  for dataset in dict.fromkeys(g.dataset for g in collection.groups if g.dataset):
    config = next(r.settings for r in collection.runs if r.dataset == dataset)
    try:
      loaded = data.load_dataset(dataset, data_dir=config.get("data_dir"))
    except Exception as e:  # A report still comes out where the data set is not at hand.
      samples.append({"dataset": dataset, "file": None, "error": str(e).splitlines()[0]})
      continue
    path = figures.samples_figure(
        loaded.train_images, loaded.train_labels, loaded.info.class_names,
        f"{dataset}: samples of every class (the first eight of each in the train split)",
        out / f"samples_{_slug(dataset)}.png")
    samples.append({"dataset": dataset, "file": path.name, "source": loaded.source})
  return samples


def build_report(runs_dir: str | pathlib.Path, out_dir: str | pathlib.Path) -> dict[str, Any]:
  """Writes OUT/report.md, OUT/report.html, OUT/report.json and the PNG figures; returns the
  JSON document."""
  collection = find_runs(runs_dir)
  if not collection.runs:
    raise FileNotFoundError(f"no run directories (with a config.json) or lab.json under "
                            f"{runs_dir}")
  out = pathlib.Path(out_dir)
  if out.exists() and not out.is_dir():
    raise ValueError(f"--out {out} is a file, not a directory")
  (out / "confusion").mkdir(parents=True, exist_ok=True)
  rows = experiment_rows(collection)
  groups = collection.groups
  plotted = [g for g in groups if g.completed]
  ranked = sorted(zip(rows, groups), key=lambda rg: -(rg[0]["final_val_accuracy"]["mean"] or -1))
  top = [g for row, g in ranked if g.completed][:TOP]
  files = {}
  if plotted:
    for key, name, title in (("val_accuracy", "val_accuracy", "Validation accuracy"),
                             ("val_loss", "val_loss", "Validation loss")):
      files[name] = figures.curves_figure(
          plotted, key, f"{title} per epoch, all experiments (mean over seeds; band: range)",
          title.lower(), out / f"{name}.png").name
      files[f"top5_{name}"] = figures.curves_figure(
          top, key, f"{title} per epoch, top {len(top)} by final validation accuracy",
          title.lower(), out / f"top5_{name}.png").name
    files["train_vs_validation"] = figures.train_vs_validation_figure(
        plotted, out / "train_vs_validation.png").name
  for row in rows:
    confusion = row["confusion"]
    if confusion:
      accuracy = row["final_val_accuracy"]["mean"]
      path = figures.confusion_figure(
          np.asarray(confusion["matrix"]), confusion["class_names"],
          f"{row['label']} on {row['dataset']}: final checkpoint\n"
          f"mean over {confusion['seeds']} seed(s), accuracy {accuracy:.4f}",
          out / "confusion" / f"{_slug(row['label'])}.png")
      confusion["file"] = path.relative_to(out).as_posix()
  samples = _sample_images(collection, out)
  document = {
      "runs_dir": str(pathlib.Path(runs_dir).resolve()),
      "generated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "labs": [{k: lab.get(k) for k in ("lab", "dir", "source", "settings", "experiments",
                                        "seeds")} for lab in collection.labs],
      "baseline": rows[0]["label"] if rows else None,
      "top5": [g.label for g in top],
      "experiments": rows,
      "runs": [{"path": r.path, "experiment": r.experiment, "seed": r.seed, "status": r.status,
                "epochs_completed": len(r.history), "epochs": r.epochs,
                "final_val_accuracy": r.summary.get("final_val_accuracy"),
                "best_val_accuracy": r.summary.get("best_val_accuracy"),
                **({"error": r.error} if r.error else {})} for r in collection.runs],
      "figures": files, "samples": samples,
  }
  blocks = render.report_blocks(document, table_rows(rows))
  (out / "report.md").write_text(render.markdown(blocks))
  (out / "report.html").write_text(render.html(blocks, out, title="jaxlab lab report"))
  write_json(out / "report.json", document)
  return document
