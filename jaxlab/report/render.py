"""The report as blocks, rendered as Markdown beside its PNGs or as one self-contained HTML page.

Blocks are headings, paragraphs, tables, images and lists."""

from __future__ import annotations

import base64
import dataclasses
import html as html_lib
import pathlib
from typing import Any, Sequence, Union

from jaxlab.report.findings import settled
from jaxlab.report.stats import POWER, PRACTICAL_SEEDS


@dataclasses.dataclass
class Heading:
  text: str
  level: int = 2


@dataclasses.dataclass
class Paragraph:
  text: str


@dataclasses.dataclass
class Table:
  header: list[str]
  rows: list[list[str]]


@dataclasses.dataclass
class Image:
  file: str  # Relative to the report's folder.
  alt: str


@dataclasses.dataclass
class Items:
  items: list[str]


@dataclasses.dataclass
class Details:
  """Images one click away: a folded section in HTML, a list of links in Markdown."""

  summary: str
  images: list[Image]


Block = Union[Heading, Paragraph, Table, Image, Items, Details]


def _md_cell(text: str) -> str:
  return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(blocks: Sequence[Block]) -> str:
  out = []
  for block in blocks:
    if isinstance(block, Heading):
      out.append(f"{'#' * block.level} {block.text}")
    elif isinstance(block, Paragraph):
      out.append(block.text)
    elif isinstance(block, Table):
      lines = ["| " + " | ".join(_md_cell(h) for h in block.header) + " |",
               "|" + "|".join(" --- " for _ in block.header) + "|"]
      lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
      out.append("\n".join(lines))
    elif isinstance(block, Image):
      out.append(f"![{block.alt}]({block.file})")
    elif isinstance(block, Items):
      out.append("\n".join(f"- {item}" for item in block.items))
    elif isinstance(block, Details):
      out.append(f"{block.summary}:\n\n" + "\n".join(f"- [{i.alt}]({i.file})"
                                                    for i in block.images))
  return "\n\n".join(out) + "\n"


_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1200px; padding: 0 1em; color: #222; }
table { border-collapse: collapse; font-size: 0.85em; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; }
th { background: #f0f3f7; }
tr:nth-child(even) td { background: #fafbfc; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
code { background: #f4f4f4; padding: 0 0.2em; }
figcaption { font-size: 0.8em; color: #555; }
details { margin: 1em 0; } summary { cursor: pointer; font-weight: 600; }
"""


def _inline(text: str) -> str:
  """HTML of a Markdown-ish line: escaped, with `code` spans."""
  parts = html_lib.escape(str(text)).split("`")
  return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _img(image: Image, folder: pathlib.Path) -> str:
  encoded = base64.b64encode((folder / image.file).read_bytes()).decode()
  return (f"<figure><img src='data:image/png;base64,{encoded}' "
          f"alt='{html_lib.escape(image.alt)}'><figcaption>{_inline(image.alt)}</figcaption>"
          "</figure>")


def html(blocks: Sequence[Block], folder: pathlib.Path, title: str) -> str:
  """One HTML page with every image inlined (data: URIs): it opens from a file, offline."""
  out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html_lib.escape(title)}"
         f"</title><style>{_STYLE}</style></head><body>"]
  for block in blocks:
    if isinstance(block, Heading):
      out.append(f"<h{block.level}>{_inline(block.text)}</h{block.level}>")
    elif isinstance(block, Paragraph):
      out.append(f"<p>{_inline(block.text)}</p>")
    elif isinstance(block, Table):
      head = "".join(f"<th>{_inline(h)}</th>" for h in block.header)
      body = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>"
                     for row in block.rows)
      out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    elif isinstance(block, Image):
      out.append(_img(block, folder))
    elif isinstance(block, Details):
      out.append(f"<details><summary>{_inline(block.summary)}</summary>"
                 + "".join(_img(i, folder) for i in block.images) + "</details>")
    elif isinstance(block, Items):
      out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in block.items) + "</ul>")
  out.append("</body></html>")
  return "\n".join(out) + "\n"


def _percent(x: float | None) -> str:
  return "—" if x is None else f"{x:.1%}"


def _signed(x: float | None) -> str:
  return "—" if x is None else f"{x * 100:+.1f}"


def _interval(ci: list[float] | None) -> str:
  return "—" if not ci else f"{ci[0] * 100:+.1f} to {ci[1] * 100:+.1f}"


def _needed(c: dict[str, Any]) -> str:
  if settled(c):
    return "settled"
  if c.get("collapsed"):
    return "— (collapses)"
  return "—" if c.get("seeds_needed") is None else str(c["seeds_needed"])


def _rounds(lab: dict[str, Any]) -> list[Block]:
  """What `run_lab.py --until_settled` added to a lab, round by round, and where each
  comparison stands: settled by the added seeds, settled before, or open and why."""
  if not lab.get("rounds") and not lab.get("settled"):
    return []
  rounds = lab.get("rounds", [])
  asked = {w["comparison"] for r in rounds for w in r.get("why", [])}
  blocks: list[Block] = [
      Heading("Seeds added until the questions settle", 3),
      Paragraph(f"`run_lab.py --until_settled` on lab `{lab['lab']}`: {len(rounds)} round(s), "
                "each adding seeds only to the experiments of comparisons these seeds could "
                "not settle but a number within the budget might (the seeds-needed estimate; "
                "two first where an experiment had one).")]
  blocks.append(Items([f"Round {r['round']} ({r['status']}): seeds "
                       + "; ".join(f"{', '.join(map(str, seeds))} to `{name}`"
                                   for name, seeds in r["added"].items())
                       + " for " + ", ".join(f"`{w['comparison']}` ({w['had'][0]}/"
                                             f"{w['had'][1]} seeds, about {w['seeds_needed']} "
                                             "needed)" for w in r.get("why", []))
                       for r in rounds]))
  blocks.append(Items([f"`{s['comparison']}` ({'/'.join(map(str, s['seeds']))} seeds): "
                       + ("settled by the added seeds" if s["settled"] and s["comparison"] in asked
                          else s["why"]) for s in lab.get("settled", [])]))
  return blocks


def _findings(document: dict[str, Any]) -> list[Block]:
  found = document["findings"]
  blocks: list[Block] = [Heading("Findings")]
  if not any(r["final_val_accuracy"]["n"] for r in document["experiments"]):
    return blocks + [Paragraph("No run has completed yet: nothing to conclude.")]
  tests = sum(c.get("p") is not None for q in found["questions"] for c in q["comparisons"])
  if found["questions"]:
    blocks.append(Paragraph(
        "Each comparison is the difference of the final validation accuracies' means over "
        "seeds, in points, with its 95% Welch interval; it is called a difference only where "
        f"Welch's test, Holm-corrected over the report's {tests} comparisons, is below 0.05. "
        "With three seeds an interval is wide: 'cannot tell apart' says the data is too thin "
        "to decide, not that the two are equal."))
  else:
    blocks.append(Paragraph("The lab declares no questions (a lab module's `QUESTIONS`): what "
                            "follows compares every experiment at once."))
  for q in found["questions"]:
    blocks += [Heading(f"{q['topic']}: {q['question']}", 3)]
    if q.get("seed_answer"):
      blocks.append(Paragraph(f"Seed report: {q['seed_answer']}"))
    blocks.append(Items(q["answer"]))
  comparisons = [c for q in found["questions"] for c in q["comparisons"]]
  if comparisons:
    blocks += [Heading("Every comparison", 3),
               Paragraph("Seeds needed: per experiment, for Welch's test, Holm-corrected, to "
                         f"call the observed difference real with {POWER:.0%} power if it is "
                         "the true one (noncentral t; the level of the correction's first "
                         "step), or — where no practical number (up to "
                         f"{PRACTICAL_SEEDS}) would, or where collapsed runs make the spread."),
               Table(["comparison", "on", "Δ points", "95% CI", "Holm p", "verdict",
                      "seeds", "seeds needed"],
                     [[f"{c['experiment']} − {c['against']}",
                       c.get("metric", "final") + ("" if c.get("on", "accuracy") == "accuracy"
                                                   else f" val {c['on']}"),
                       _signed(c["difference"]), _interval(c["ci95"]),
                       "—" if c["p_holm"] is None else f"{c['p_holm']:.2g}",
                       ("difference" if settled(c) else "not settled") + (f" ({c['verdict']})" if c.get("verdict") else ""),
                       "/".join(map(str, c["n"])), _needed(c)] for c in comparisons])]
  for lab in document["labs"]:
    blocks += _rounds(lab)
  blocks += [Heading("Against the seed report", 3), Paragraph(found["rank_sentence"])]
  tiers = found["tiers"]
  if tiers:
    blocks += [Heading("Experiments the data cannot tell apart", 3),
               Paragraph("Tiers by final validation accuracy: each holds the best remaining "
                         "experiment and every one whose difference from it is not significant "
                         "(Welch, Holm-corrected within the tier); experiments with fewer than "
                         "two seeds are left out. This replaces a ranking: inside a tier, order "
                         "is noise."),
               Items([f"Tier {i + 1}: " + ", ".join(f"`{name}`" for name in tier)
                      for i, tier in enumerate(tiers)])]
  return blocks


def report_blocks(document: dict[str, Any], table: tuple[list[str], list[list[str]]]) -> list[Block]:
  """The report's content, in order, from report.json's document and the results table."""
  rows = document["experiments"]
  runs = document["runs"]
  labs = document["labs"]
  title = ", ".join(dict.fromkeys(lab["lab"] for lab in labs if lab.get("lab"))) or "runs"
  completed = sum(r["status"] == "completed" for r in runs)
  blocks: list[Block] = [
      Heading(f"Lab report: {title}", 1),
      Paragraph(f"{len(runs)} runs in `{document['runs_dir']}` (relative to this report; "
                f"{completed} completed), {len(rows)} experiments; generated "
                f"{document['generated']}."),
  ]
  for lab in labs:
    settings = ", ".join(f"{k}={v}" for k, v in (lab.get("settings") or {}).items()) or "none"
    where = f" in `{lab['dir']}`" if lab.get("dir") not in (None, "", ".") else ""
    blocks.append(Paragraph(f"Lab `{lab['lab']}`{where}, declared in `{lab.get('source')}`: "
                            f"seeds {lab.get('seeds')}, settings changed from the declarations: "
                            f"{settings}."))
  if not completed:
    blocks.append(Paragraph("No run has completed: the tables below list what is failed, "
                            "running or missing."))
  blocks += _findings(document)
  header, cells = table
  baseline = document["baseline"]
  blocks += [
      Heading("Results"),
      Table(header, cells),
      Paragraph("Validation accuracy is on the data set's test split, as in the reports. "
                "Mean ± sample standard deviation over seeds, then the mean's 95% t interval "
                "(n completed runs). `last 3 epochs` is the mean over seeds of each run's mean "
                "validation accuracy over its last three epochs, less noisy than the final "
                "epoch. `best epoch` is each run's best epoch, chosen on the same split it is "
                "measured on: an optimistic figure, not a held-out result. s/epoch is the "
                "median training time of an epoch, on the device named, for the whole vmapped "
                "group where a group of seeds trained as one (divide by its size for one run). "
                "`seed report` is the report's own figure (final, or final / best) and the data "
                "set it was measured on; Δ is this table's mean minus that figure, only where "
                f"the data sets match. p is the two-sided Welch's t-test against {baseline} "
                "(final accuracies), Holm p its Holm correction over the table's tests."),
  ]
  figures = document["figures"]
  if figures.get("forest"):
    blocks += [Heading("Final accuracy of every seed"),
               Image(figures["forest"], "final validation accuracy per experiment: seeds, "
                                        "mean and 95% interval")]
  unfinished = [r for r in runs if r["status"] != "completed"]
  if unfinished:
    blocks += [Heading("Runs not in the numbers"),
               Paragraph("These runs are listed, not counted: the table's n counts completed "
                         "runs only."),
               Items([f"`{r['path']}`: {r['status']}"
                      + (f" ({r['epochs_completed']} of {r['epochs']} epochs)"
                         if r["status"] == "running" else "")
                      + (f": {r['error']}" if r.get("error") else "") for r in unfinished])]
  if figures.get("val_accuracy"):
    blocks += [
        Heading("Validation curves"),
        Paragraph("Each line is an experiment's mean over its seeds, the band the range over "
                  "seeds; an experiment keeps its colour, line style and marker in every figure."
                  + (" The right panel zooms on the experiments within 10 points of the median "
                     "final accuracy." if document.get("zoomed") else "")
                  + " Loss is on a log scale, so that failures do not flatten the rest."),
        Image(figures["val_accuracy"], "validation accuracy per epoch"),
        Image(figures["val_loss"], "validation loss per epoch (log scale)"),
        Heading("Train against validation accuracy"),
        Image(figures["train_vs_validation"], "train and validation accuracy per experiment"),
    ]
  if document.get("other_metrics"):
    header, cells = document["other_metrics"]
    blocks += [Heading("The experiments' own metrics (final epoch)"),
               Table(header, cells),
               Paragraph("Each metric an experiment declares beside loss and accuracy "
                         "(`jaxlab.metrics`), on the validation split: mean ± sample standard "
                         "deviation over the completed seeds (n).")]
  if document.get("class_accuracy"):
    header, cells = document["class_accuracy"]
    blocks += [Heading("Accuracy per class (final checkpoint, mean over seeds)"),
               Table(header, cells)]
  confusions = document["confusion_figures"]
  if confusions["shown"]:
    blocks.append(Heading("Confusion matrices (final checkpoint)"))
    by_label = {r["label"]: r for r in rows}
    for shown in confusions["shown"]:
      confusion = by_label[shown["label"]]["confusion"]
      blocks += [Heading(f"{shown['label']}: {shown['why']}", 3),
                 Image(shown["file"], f"confusion matrix of {shown['label']}"),
                 Paragraph("Most confused (true → predicted, mean count over seeds): " + "; ".join(
                     f"{p['true']} → {p['predicted']}: {p['count']:.1f} "
                     f"({_percent(p['fraction_of_true'])} of {p['true']})"
                     for p in confusion["most_confused"]) + "." if confusion["most_confused"]
                     else "No confusions.")]
    if confusions["others"]:
      blocks.append(Details("The other experiments' confusion matrices",
                            [Image(o["file"], f"confusion matrix of {o['label']}")
                             for o in confusions["others"]]))
  if document["samples"]:
    blocks.append(Heading("Samples of every class"))
    for sample in document["samples"]:
      if sample["file"]:
        blocks.append(Image(sample["file"], f"sample images of every class of "
                                            f"{sample['dataset']}"))
      else:
        blocks.append(Paragraph(f"{sample['dataset']}: no sample images, the data set could "
                                f"not be read: {sample['error']}"))
  blocks += [Heading("Every run"),
             Table(["run", "experiment", "seed", "status", "epochs", "final val acc",
                    "best val acc (chosen on val)"],
                   [[r["path"], r["experiment"], str(r["seed"]), r["status"],
                     f"{r['epochs_completed']}/{r['epochs'] or '?'}",
                     f"{r['final_val_accuracy']:.4f}" if r["final_val_accuracy"] is not None
                     else "—",
                     f"{r['best_val_accuracy']:.4f}" if r["best_val_accuracy"] is not None
                     else "—"] for r in runs])]
  return blocks
