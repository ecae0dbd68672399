"""The lab report: tables over seeds, curves, confusion matrices, as Markdown, HTML and JSON.

Built from run directories alone: a results table over seeds, curves, confusion matrices and
sample images, as Markdown, a self-contained HTML page and JSON.
"""

from __future__ import annotations

import datetime
import os
import pathlib
import re
import shutil
import statistics
from typing import Any

import numpy as np

from jaxlab import data
from jaxlab.config import WHERE_SETTINGS
from jaxlab.errors import BadValue, MissingFile, UserError, one_line, output
from jaxlab.files import write_json
from jaxlab.report import figures, findings, render
from jaxlab.report.runs import Collection, Group, find_runs
from jaxlab.report.stats import (holm, indistinguishable_tiers, seed_figure, seeds_needed,
                                 spread, welch_p_value)
from jaxlab.rundir.run import Run

LAST_EPOCHS = 3  # The mean of the last epochs, beside the final one.
ZOOM_POINTS = 0.10  # Zoomed panels: experiments within 10 points of the median final accuracy.
UNSTABLE_STD = findings.UNSTABLE_POINTS  # Seeds that disagree: per-seed confusion matrices.
CONFUSED_PAIRS = 3  # Most confused pairs listed per experiment.


def _class_names(group: Group, size: int) -> list[str]:
  """The data set's class names: its registry entry's, else what its runs' config.json says
  (a data set a lab file declares), else the class indexes."""
  names = (list(data.DATASETS.get(group.dataset).class_names) if group.dataset in data.DATASETS
           else next((r.data["class_names"] for r in group.runs if r.data.get("class_names")),
                     []))
  return names if len(names) == size else [str(i) for i in range(size)]


def _confusion(group: Group) -> dict[str, Any] | None:
  """The final checkpoint's confusion matrix of every seed and their mean, each seed's
  per-class accuracy (recall), and the most confused pairs (true class, predicted class) by mean
  count."""
  done = [r for r in group.completed if "confusion_matrix" in
          r.summary.get("evaluation", {}).get("final", {})]
  if not done:
    return None
  matrices = [np.asarray(r.summary["evaluation"]["final"]["confusion_matrix"], float)
              for r in done]
  matrix = np.mean(matrices, axis=0)
  names = _class_names(group, len(matrix))
  support = matrix.sum(1)
  pairs = sorted(((matrix[i, j], i, j) for i in range(len(matrix)) for j in range(len(matrix))
                  if i != j and matrix[i, j] > 0), reverse=True)[:CONFUSED_PAIRS]
  recall = [(np.diag(m) / np.maximum(m.sum(1), 1)).tolist() for m in matrices]
  return {"matrix": matrix.tolist(), "class_names": names, "seeds": len(matrices),
          "per_seed": {str(r.seed): m.tolist() for r, m in zip(done, matrices)},
          "class_accuracy": np.mean(recall, axis=0).tolist(),
          "class_accuracy_per_seed": {str(r.seed): a for r, a in zip(done, recall)},
          "most_confused": [{"true": names[i], "predicted": names[j], "count": float(c),
                             "fraction_of_true": float(c / support[i]) if support[i] else None}
                            for c, i, j in pairs]}


def _last_epochs(run: Run, key: str = "val_accuracy") -> float | None:
  """The mean of `key` over the run's last LAST_EPOCHS epochs (fewer if it has fewer)."""
  values = [r[key] for r in run.history[-LAST_EPOCHS:] if r.get(key) is not None]
  return statistics.fmean(values) if values else None


def _timing(group: Group) -> dict[str, Any] | None:
  """Median seconds of a training epoch, with what it was measured on: the device, the
  backend's kernels, and the size of the vmapped group that shared the epoch."""
  done = [r for r in group.completed if r.summary.get("median_epoch_seconds") is not None]
  if not done:
    return None
  sizes = [len(r.summary.get("group") or [r.path]) for r in done]
  environment = done[0].environment
  seconds = statistics.median(r.summary["median_epoch_seconds"] for r in done)
  size = max(sizes)
  return {"seconds_per_epoch": seconds, "group_size": size,
          "seconds_per_member_epoch": seconds / size,
          "device": _device(environment), "backend": environment.get("backend"),
          "kernels": environment.get("kernels"), "device_count": environment.get("device_count")}


def _device(environment: dict[str, Any]) -> str:
  """The device a run trained on, in words: the GPU's kind, or the CPU's model and the cores
  it had (runs that did not record them: the backend's name for it)."""
  if environment.get("cpu"):
    cores = environment.get("cores")
    return environment["cpu"] + (f", {cores} cores" if cores else "")
  return environment.get("device") or "?"


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
    last = [(r.seed, _last_epochs(r)) for r in done]
    last = [(s, v) for s, v in last if v is not None]
    summaries = [r.summary for r in group.runs if r.summary]
    about = group.about
    figure = seed_figure(about.get("seed_accuracy", ""))
    final_stats, best_stats = spread(final, seeds), spread(best, seeds)
    same_data = bool(about.get("seed_dataset")) and about.get("seed_dataset") == group.dataset
    delta = {key: (stats["mean"] - figure[key]
                   if same_data and stats["mean"] is not None and figure[key] is not None
                   else None)
             for key, stats in (("final", final_stats), ("best", best_stats))}
    timing = _timing(group)
    rows.append({
        "experiment": group.experiment, "label": group.label, "dataset": group.dataset,
        "lab": about.get("lab", ""),
        "params": summaries[0].get("total_params") if summaries else None,
        "epochs": next((r.epochs for r in group.runs if r.epochs), None),
        "seconds_per_epoch": timing["seconds_per_epoch"] if timing else None,
        "timing": timing,
        "seeds": seeds, "runs": [r.path for r in group.runs],
        "not_completed": [{"path": r.path, "status": r.status, "note": r.note()}
                          for r in group.runs if r.status != "completed"],
        "final_val_accuracy": final_stats,
        f"last{LAST_EPOCHS}_val_accuracy": spread([v for _, v in last], [s for s, _ in last]),
        # Chosen on the split it is reported on: an optimistic figure, not a test result.
        "best_val_accuracy": {**best_stats, "chosen_on": "validation split"},
        "seed_report": {"figure": about.get("seed_accuracy", ""), **figure,
                        "dataset": about.get("seed_dataset", ""),
                        "section": about.get("report", "")},
        "difference_vs_seed": delta,
        "p_value_vs_baseline": (welch_p_value(final, base_final)
                                if group is not baseline else None),
        "confusion": _confusion(group),
        "metrics": _other_metrics(done),
    })
  for row, p in zip(rows, holm([r["p_value_vs_baseline"] for r in rows])):
    row["p_holm_vs_baseline"] = p
  return rows


BUILTIN_METRICS = ("loss", "accuracy")  # The report's own columns; any other metric below.


def _other_metrics(done: list[Run]) -> dict[str, dict[str, Any]]:
  """Each metric of the completed runs beyond loss and accuracy (an experiment's own, as its
  config.json lists them): final and last-3 validation values over seeds, and its direction."""
  names = dict.fromkeys(name for r in done for name in r.metrics if name not in BUILTIN_METRICS)
  found = {}
  for name in names:
    key = f"val_{name}"
    final = [(r.seed, r.history[-1].get(key)) for r in done if r.history]
    last = [(r.seed, _last_epochs(r, key)) for r in done]
    final, last = ([(s, v) for s, v in pairs if v is not None] for pairs in (final, last))
    found[name] = {"final": spread([v for _, v in final], [s for s, _ in final]),
                   f"last{LAST_EPOCHS}": spread([v for _, v in last], [s for s, _ in last]),
                   "higher_is_better": next(r.metrics[name].get("higher_is_better", True)
                                            for r in done if name in r.metrics)}
  return found


def other_metrics_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]] | None:
  """Experiments x the other metrics: final validation value, mean ± std over seeds."""
  names = list(dict.fromkeys(name for r in rows for name in r.get("metrics", {})))
  if not names:
    return None
  return (["experiment", *(f"final val {name}" for name in names)],
          [[r["label"], *(_mean_std(r["metrics"][name]["final"]) if name in r["metrics"]
                          else "—" for name in names)] for r in rows])


def _evidence(rows: list[dict[str, Any]]) -> findings.Evidence:
  """What the findings read, per experiment (its first configuration where it has several)."""
  first = {}
  for row in rows:
    first.setdefault(row["experiment"], row)
  return findings.Evidence(
      final={k: list(r["final_val_accuracy"]["per_seed"].values()) for k, r in first.items()},
      best={k: [r["best_val_accuracy"]["per_seed"][s] for s in r["final_val_accuracy"]["per_seed"]]
            for k, r in first.items()},
      seed_figure={k: r["seed_report"]["final"] for k, r in first.items()},
      seed_dataset={k: r["seed_report"]["dataset"] for k, r in first.items()},
      dataset={k: r["dataset"] for k, r in first.items()},
      last3={k: [r[f"last{LAST_EPOCHS}_val_accuracy"]["per_seed"][s]
                 for s in r["final_val_accuracy"]["per_seed"]
                 if s in r[f"last{LAST_EPOCHS}_val_accuracy"]["per_seed"]]
             for k, r in first.items()},
      others={name: {summary: {k: list(r["metrics"][name][key]["per_seed"].values())
                               for k, r in first.items() if name in r.get("metrics", {})}
                     for summary, key in (("final", "final"), ("last3", f"last{LAST_EPOCHS}"))}
              for name in dict.fromkeys(n for r in first.values() for n in r.get("metrics", {}))})


def study(collection: Collection, rows: list[dict[str, Any]]) -> dict[str, Any]:
  """The findings: each lab's questions answered, the tiers the data cannot split, and the rank
  agreement with the seed report."""
  evidence = _evidence(rows)
  questions = [findings.Question.from_json(q) for lab in collection.labs
               for q in lab.get("questions") or []]
  baseline = rows[0]["experiment"] if rows else ""
  labelled = {r["label"]: list(r["final_val_accuracy"]["per_seed"].values()) for r in rows}
  means = {k: statistics.fmean(v) for k, v in evidence.final.items() if v}
  agreement = findings.rank_agreement(evidence, means)
  tiers = indistinguishable_tiers(labelled)
  return {"questions": findings.answer(questions, evidence, baseline) if questions else [],
          "tiers": tiers, "tier_pairs": _tier_pairs(tiers, labelled),
          "rank_agreement": agreement, "rank_sentence": findings.rank_sentence(agreement)}


def _tier_pairs(tiers: list[list[str]], samples: dict[str, list[float]]) -> list[dict[str, Any]]:
  """Each pair a tier holds together (its best and each other member), with the seeds per
  experiment that would split it if the observed difference is real (the tier's tests counted
  for the correction)."""
  pairs = []
  for tier in tiers:
    for other in tier[1:]:
      a, b = samples[tier[0]], samples[other]
      pairs.append({"experiment": tier[0], "against": other,
                    "difference": statistics.fmean(a) - statistics.fmean(b),
                    "seeds_needed": seeds_needed(a, b, len(tier) - 1)})
  return pairs


def _mean_std(stats: dict[str, Any], interval: bool = False) -> str:
  """mean ± std (n), with the mean's 95% t interval in brackets before (n) if `interval`."""
  if stats["mean"] is None:
    return "— (n=0)"
  text = f"{stats['mean']:.4f}" + (f" ± {stats['std']:.4f}" if stats["std"] is not None else "")
  if interval and stats.get("ci95"):
    text += " [{:.3f}, {:.3f}]".format(*stats["ci95"])
  return f"{text} (n={stats['n']})"


def _signed(value: float | None) -> str:
  return "—" if value is None else f"{value:+.4f}"


def _seconds(timing: dict[str, Any] | None) -> str:
  if not timing:
    return "—"
  size = timing["group_size"]
  return (f"{timing['seconds_per_epoch']:.2f} ({timing['device']}"
          + (f", group of {size}" if size > 1 else "") + ")")


def _p(p: float | None) -> str:
  return "—" if p is None else f"{p:.2g}"


def table_rows(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
  """The results table's header and cells."""
  baseline = rows[0]["label"] if rows else ""
  header = ["experiment", "data set", "params", "epochs", "s/epoch (device, group)",
            "final val acc: mean ± std [95% CI]", f"last {LAST_EPOCHS} epochs (mean)",
            "best epoch (chosen on val)", "seed report (its data set)", "Δ final / best vs report",
            f"p vs {baseline}", "Holm p"]
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
    last = row[f"last{LAST_EPOCHS}_val_accuracy"]
    cells.append([
        row["label"], row["dataset"],
        f"{row['params']:,}" if row["params"] is not None else "—",
        str(row["epochs"] or "—"), _seconds(row.get("timing")),
        _mean_std(row["final_val_accuracy"], interval=True),
        f"{last['mean']:.4f}" if last["mean"] is not None else "—",
        _mean_std(row["best_val_accuracy"]),
        f"{seed['figure']} ({seed['dataset']})" if seed["figure"] else "—",
        delta,
        "baseline" if i == 0 else _p(row["p_value_vs_baseline"]),
        "" if i == 0 else _p(row.get("p_holm_vs_baseline")),
    ])
  column = header.index("Δ final / best vs report")
  if not any(any(v is not None for v in row["difference_vs_seed"].values()) for row in rows):
    # No seed figure on these data sets: the column says nothing (rank agreement does).
    header = header[:column] + header[column + 1:]
    cells = [row[:column] + row[column + 1:] for row in cells]
  return header, cells


def class_accuracy_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]] | None:
  """Experiments x classes: each class's accuracy (recall) at the final checkpoint, mean over
  seeds."""
  having = [r for r in rows if r["confusion"]]
  if not having:
    return None
  names = having[0]["confusion"]["class_names"]
  return (["experiment", *names],
          [[r["label"], *(f"{a:.3f}" for a in r["confusion"]["class_accuracy"])]
           for r in having if r["confusion"]["class_names"] == names])


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
    except UserError as e:  # Not at hand here (a bug in loading it keeps its traceback).
      samples.append({"dataset": dataset, "file": None, "error": one_line(e)})
      continue
    path = figures.samples_figure(
        loaded.train_images, loaded.train_labels, loaded.info.class_names,
        f"{dataset}: samples of every class (the first eight of each in the train split)",
        out / f"samples_{_slug(dataset)}.png")
    # The kind of source ("IDX files"), not its directory: no machine's path in a report.
    samples.append({"dataset": dataset, "file": path.name,
                    "source": loaded.source.split(" in /")[0]})
  return samples


SMALL_FILES = ("config.json", "metrics.json", "metrics.jsonl")  # A run's files, but its weights.


def copy_small_files(runs_dir: str | pathlib.Path, to: str | pathlib.Path) -> pathlib.Path:
  """Copies what a report reads (every lab.json, and each run's config.json, metrics.json and
  metrics.jsonl; no checkpoints, no event files) from `runs_dir` into `to`, keeping the
  layout: a folder of kilobytes from which the report is rebuilt anywhere."""
  source, target = pathlib.Path(runs_dir), pathlib.Path(to)
  if not source.is_dir():
    raise MissingFile(f"--runs {source} is not a directory")
  if target.resolve() == source.resolve():
    return target
  found = [p for name in ("lab.json", *SMALL_FILES) for p in source.rglob(name)
           if target.resolve() not in p.resolve().parents]
  for path in found:
    copy = target / path.relative_to(source)
    copy.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, copy)
  return target


def _source(path: str | None) -> str | None:
  """A lab file's name as the report shows it: from `experiments/` on for a lab of the
  repository, its file name otherwise (no machine's absolute path in a report)."""
  if not path:
    return path
  parts = pathlib.PurePath(path).parts
  return "/".join(parts[parts.index("experiments"):]) if "experiments" in parts else parts[-1]


def _most_in_range(rows: list[dict[str, Any]]) -> list[str]:
  """The experiments whose final accuracy lies within ZOOM_POINTS of the median one's: where
  most curves are, for the zoomed panels."""
  means = {r["label"]: r["final_val_accuracy"]["mean"] for r in rows
           if r["final_val_accuracy"]["mean"] is not None}
  if len(means) < 3:
    return []
  middle = statistics.median(means.values())
  inside = [k for k, v in means.items() if abs(v - middle) <= ZOOM_POINTS]
  return inside if len(inside) < len(means) else []


def _confusion_figures(rows: list[dict[str, Any]], found: dict[str, Any], out: pathlib.Path
                       ) -> dict[str, Any]:
  """Every experiment's confusion matrix (mean over seeds) in confusion/; the baseline's, the
  best's and the failures' (per seed where the seeds disagree) shown in the report."""
  having = [r for r in rows if r["confusion"]]
  if not having:
    return {"shown": [], "others": []}
  unstable = {s["experiment"] for q in found["questions"] for s in q["stability_checks"]
              if s.get("unstable")}
  means = [r["final_val_accuracy"]["mean"] for r in having]
  middle = statistics.median(means)
  best = max(having, key=lambda r: r["final_val_accuracy"]["mean"])
  failed = [r for r in having if r["experiment"] in unstable
            or r["final_val_accuracy"]["mean"] < middle - ZOOM_POINTS]
  chosen = {having[0]["label"]: "the baseline", best["label"]: "the best final mean"}
  for r in failed:
    chosen.setdefault(r["label"], "a failure")
  shown, others = [], []
  for row in having:
    confusion = row["confusion"]
    title = (f"{row['label']} on {row['dataset']}, final checkpoint, accuracy "
             f"{row['final_val_accuracy']['mean']:.4f}")
    stem = out / "confusion" / _slug(row["label"])
    mean = figures.confusion_figure([np.asarray(confusion["matrix"])], confusion["class_names"],
                                    f"{title} (mean over {confusion['seeds']} seed(s))",
                                    stem.with_suffix(".png"))
    confusion["file"] = mean.relative_to(out).as_posix()
    std = row["final_val_accuracy"]["std"]
    if row["label"] in chosen and confusion["seeds"] > 1 and std and std > UNSTABLE_STD:
      seeds = list(confusion["per_seed"].items())
      path = figures.confusion_figure(
          [np.asarray(m) for _, m in seeds], confusion["class_names"],
          f"{title}: each seed (they disagree: std {std:.3f})", stem.with_name(
              stem.name + "_seeds.png"),
          [f"seed {s}: accuracy {row['final_val_accuracy']['per_seed'][s]:.4f}"
           for s, _ in seeds])
      confusion["seeds_file"] = path.relative_to(out).as_posix()
    entry = {"label": row["label"], "why": chosen.get(row["label"]),
             "file": confusion.get("seeds_file") or confusion["file"]}
    (shown if row["label"] in chosen else others).append(entry)
  return {"shown": shown, "others": others}


def build_report(runs_dir: str | pathlib.Path, out_dir: str | pathlib.Path) -> dict[str, Any]:
  """Writes OUT/report.md, OUT/report.html, OUT/report.json and the PNG figures; returns the
  JSON document."""
  collection = find_runs(runs_dir)
  if not collection.runs:
    raise MissingFile(f"no run directories (with a config.json) or lab.json under "
                      f"{runs_dir}")
  out = pathlib.Path(out_dir)
  if out.exists() and not out.is_dir():
    raise BadValue(f"--out {out} is a file, not a directory")
  with output(out, "--out"):
    (out / "confusion").mkdir(parents=True, exist_ok=True)
  for old in (out / "confusion").glob("*.png"):  # A rebuilt report keeps no stale figure.
    old.unlink()
  rows = experiment_rows(collection)
  groups = collection.groups
  plotted = [g for g in groups if g.completed]
  style = figures.styles([g.label for g in groups])
  zoom = _most_in_range(rows)
  found = study(collection, rows)
  files = {}
  if plotted:
    files["forest"] = figures.forest_figure(rows, style, out / "forest.png", zoom).name
    files["val_accuracy"] = figures.curves_figure(
        plotted, "val_accuracy", "Validation accuracy per epoch (mean over seeds; band: range)",
        "validation accuracy", out / "val_accuracy.png", style, zoom=zoom).name
    files["val_loss"] = figures.curves_figure(
        plotted, "val_loss", "Validation loss per epoch (mean over seeds; band: range)",
        "validation loss", out / "val_loss.png", style, log=True).name
    files["train_vs_validation"] = figures.train_vs_validation_figure(
        plotted, out / "train_vs_validation.png", style).name
  for stale in ("top5_val_accuracy.png", "top5_val_loss.png"):  # Older reports' figures.
    (out / stale).unlink(missing_ok=True)
  confusions = _confusion_figures(rows, found, out)
  samples = _sample_images(collection, out)
  document = {
      "runs_dir": os.path.relpath(pathlib.Path(runs_dir).resolve(), out.resolve()),
      "generated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "labs": [{**{k: lab.get(k) for k in ("lab", "dir", "experiments", "seeds")},
                **{k: lab[k] for k in ("rounds", "settled") if k in lab},
                "settings": {k: v for k, v in (lab.get("settings") or {}).items()
                             if k not in WHERE_SETTINGS},
                "source": _source(lab.get("source"))} for lab in collection.labs],
      "baseline": rows[0]["label"] if rows else None,
      "zoomed": zoom,
      "findings": found,
      "experiments": rows,
      "class_accuracy": class_accuracy_table(rows),
      "other_metrics": other_metrics_table(rows),
      "runs": [{"path": r.path, "experiment": r.experiment, "seed": r.seed, "status": r.status,
                "epochs_completed": len(r.history), "epochs": r.epochs,
                "final_val_accuracy": r.summary.get("final_val_accuracy"),
                "best_val_accuracy": r.summary.get("best_val_accuracy"),
                "history": r.history,
                **({"error": r.error} if r.error else {})} for r in collection.runs],
      "figures": files, "confusion_figures": confusions, "samples": samples,
  }
  blocks = render.report_blocks(document, table_rows(rows))
  (out / "report.md").write_text(render.markdown(blocks))
  (out / "report.html").write_text(render.html(blocks, out, title="jaxlab lab report"))
  write_json(out / "report.json", document)
  return document
