"""The report as blocks, rendered as Markdown beside its PNGs or as one self-contained HTML page.

Blocks are headings, paragraphs, tables, images and lists."""

from __future__ import annotations

import base64
import dataclasses
import html as html_lib
import pathlib
from typing import Any, Sequence, Union


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


Block = Union[Heading, Paragraph, Table, Image, Items]


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
"""


def _inline(text: str) -> str:
  """HTML of a Markdown-ish line: escaped, with `code` spans."""
  parts = html_lib.escape(str(text)).split("`")
  return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


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
      encoded = base64.b64encode((folder / block.file).read_bytes()).decode()
      out.append(f"<figure><img src='data:image/png;base64,{encoded}' "
                 f"alt='{html_lib.escape(block.alt)}'></figure>")
    elif isinstance(block, Items):
      out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in block.items) + "</ul>")
  out.append("</body></html>")
  return "\n".join(out) + "\n"


def _percent(x: float | None) -> str:
  return "—" if x is None else f"{x:.1%}"


def report_blocks(document: dict[str, Any], table: tuple[list[str], list[list[str]]]) -> list[Block]:
  """The report's content, in order, from report.json's document and the results table."""
  rows = document["experiments"]
  runs = document["runs"]
  labs = document["labs"]
  title = ", ".join(dict.fromkeys(lab["lab"] for lab in labs if lab.get("lab"))) or "runs"
  completed = sum(r["status"] == "completed" for r in runs)
  blocks: list[Block] = [
      Heading(f"Lab report: {title}", 1),
      Paragraph(f"{len(runs)} runs under `{document['runs_dir']}` ({completed} completed), "
                f"{len(rows)} experiments; generated {document['generated']}."),
  ]
  for lab in labs:
    settings = ", ".join(f"{k}={v}" for k, v in (lab.get("settings") or {}).items()) or "none"
    blocks.append(Paragraph(f"Lab `{lab['lab']}` in `{lab['dir'] or '.'}` (from "
                            f"`{lab.get('source')}`): seeds {lab.get('seeds')}, overrides: "
                            f"{settings}."))
  header, cells = table
  blocks += [
      Heading("Results"),
      Table(header, cells),
      Paragraph("Validation accuracy is on the data set's test split, as in the reports. "
                "Mean ± sample standard deviation over seeds (n completed runs); s/epoch is "
                "the median training time of an epoch (of a run trained in a vmapped group: the "
                "group's epoch, all its members). `report` is the seed report's own "
                "figure (final, or final / best) and the data set it was measured on; Δ is "
                "this table's mean minus that figure, only where the data sets match. p is "
                "the two-sided Welch's t-test of the final validation accuracies against the "
                f"first experiment ({document['baseline']}), where both have two seeds or more: "
                "a small p says the difference is larger than seed-to-seed noise."),
  ]
  unfinished = [r for r in runs if r["status"] != "completed"]
  if unfinished:
    blocks += [Heading("Runs not in the numbers"),
               Paragraph("These runs are listed, not counted: the table's n counts completed "
                         "runs only."),
               Items([f"`{r['path']}`: {r['status']}"
                      + (f" ({r['epochs_completed']} of {r['epochs']} epochs)"
                         if r["status"] == "running" else "")
                      + (f": {r['error']}" if r.get("error") else "") for r in unfinished])]
  figures = document["figures"]
  if figures:
    blocks += [
        Heading("Validation curves"),
        Paragraph("Each line is an experiment's mean over its seeds; the band is the range "
                  "over seeds."),
        Image(figures["val_accuracy"], "validation accuracy per epoch, all experiments"),
        Image(figures["val_loss"], "validation loss per epoch, all experiments"),
        Heading(f"Top {len(document['top5'])} by final validation accuracy"),
        Items(document["top5"]),
        Image(figures["top5_val_accuracy"], "validation accuracy per epoch, top five"),
        Image(figures["top5_val_loss"], "validation loss per epoch, top five"),
        Heading("Train against validation accuracy"),
        Image(figures["train_vs_validation"], "train and validation accuracy per experiment"),
    ]
  confusions = [row for row in rows if row["confusion"]]
  if confusions:
    blocks.append(Heading("Confusion matrices (final checkpoint)"))
    for row in confusions:
      confusion = row["confusion"]
      blocks += [Heading(row["label"], 3),
                 Image(confusion["file"], f"confusion matrix of {row['label']}"),
                 Paragraph("Most confused (true → predicted, mean count over seeds): " + "; ".join(
                     f"{p['true']} → {p['predicted']}: {p['count']:.1f} "
                     f"({_percent(p['fraction_of_true'])} of {p['true']})"
                     for p in confusion["most_confused"]) + "." if confusion["most_confused"]
                     else "No confusions.")]
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
                    "best val acc"],
                   [[r["path"], r["experiment"], str(r["seed"]), r["status"],
                     f"{r['epochs_completed']}/{r['epochs'] or '?'}",
                     f"{r['final_val_accuracy']:.4f}" if r["final_val_accuracy"] is not None
                     else "—",
                     f"{r['best_val_accuracy']:.4f}" if r["best_val_accuracy"] is not None
                     else "—"] for r in runs])]
  return blocks
