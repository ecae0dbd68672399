"""Reading run directories: every run under a folder, and the runs grouped by experiment.

Each run is a `jaxlab.rundir.run.Run`, merged with what each lab.json expected of it.

Only the files a run leaves behind are read (config.json, metrics.json, metrics.jsonl, and any
lab.json); nothing of training is imported, so a report can be built anywhere the files are.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

from jaxlab.config import NO_RESULT_CHANGE
from jaxlab.errors import MissingFile
from jaxlab.files import read_json
from jaxlab.rundir.run import Run

# Runs that differ only in these settings (they change no result, `jaxlab.config.ROLES`) or in
# their seed are one experiment's seeds. Runs written before a setting existed lack it, which
# must not split them off either.
_NOT_IN_GROUP = ("seed", *NO_RESULT_CHANGE)


@dataclasses.dataclass
class Group:
  """The runs of one experiment with one configuration, seeds apart: one row of the table."""

  experiment: str
  label: str
  dataset: str
  runs: list[Run]

  @property
  def completed(self) -> list[Run]:
    return [r for r in self.runs if r.status == "completed"]

  @property
  def about(self) -> dict[str, Any]:
    return next((r.about for r in self.runs if r.about), {})


@dataclasses.dataclass
class Collection:
  """Everything under a report's root: runs, the labs that expected them, and their groups."""

  root: pathlib.Path
  runs: list[Run]
  labs: list[dict[str, Any]]  # Each lab.json found, with "dir" (relative) added.
  groups: list[Group]


def find_runs(root: str | pathlib.Path) -> Collection:
  """Every run directory under `root` (any depth), merged with what each lab.json expected:
  a run the lab recorded as failed, or has not started, is listed as failed or missing."""
  root = pathlib.Path(root)
  if not root.is_dir():
    raise MissingFile(f"--runs {root} is not a directory")
  runs = {}
  for config_file in sorted(root.rglob("config.json")):
    run = Run.read(config_file.parent, config_file.parent.relative_to(root).as_posix() or ".")
    if run is not None:
      runs[run.path] = run
  labs = []
  order: list[str] = []
  for lab_file in sorted(root.rglob("lab.json"), key=lambda p: (len(p.parts), p)):
    lab = read_json(lab_file)
    if "runs" not in lab:
      continue
    lab_dir = lab_file.parent.relative_to(root)
    labs.append({**lab, "dir": lab_dir.as_posix()})
    order += [e for e in lab.get("experiments", []) if e not in order]
    for expected in lab["runs"]:
      path = (lab_dir / expected["path"]).as_posix()
      run = runs.get(path)
      if run is not None and run.status != "completed" and expected.get("status") == "failed":
        run.fail(expected.get("error"))
      elif run is None:
        # Failed before it wrote anything, started and killed at once, or not started yet.
        status = {"failed": "failed", "running": "running"}.get(expected.get("status"),
                                                                "missing")
        settings = {k: expected[k] for k in ("experiment", "seed", "dataset", "epochs")
                    if expected.get(k) is not None}
        runs[path] = Run(root / path, settings=settings, path=path, status=status,
                         error=expected.get("error"))
  ordered = sorted(runs.values(), key=lambda r: (
      order.index(r.experiment) if r.experiment in order else len(order), r.path))
  return Collection(root, ordered, labs, group_runs(ordered))


def group_runs(runs: list[Run]) -> list[Group]:
  """Runs of one experiment and one configuration (seeds, and where the data lives, apart) form
  a group; an experiment run with several configurations gets labels naming the differences."""
  keyed: dict[tuple, list[Run]] = {}
  for run in runs:
    if run.on_disk:
      settings = tuple(sorted((k, json.dumps(v)) for k, v in run.settings.items()
                              if k not in _NOT_IN_GROUP))
      keyed.setdefault((run.experiment, settings), []).append(run)
  # A run without a directory joins its experiment's group on its data set, if there is one.
  for run in runs:
    if not run.on_disk:
      fits = [k for k in keyed if k[0] == run.experiment
              and dict(k[1]).get("dataset") == json.dumps(run.dataset)]
      key = fits[0] if len(fits) == 1 else (run.experiment, (("dataset", json.dumps(run.dataset)),))
      keyed.setdefault(key, []).append(run)
  groups = []
  for (experiment, settings), members in keyed.items():
    # Label by the settings that differ from the experiment's other configurations (a group of
    # runs without directories has only a data set, and is labelled by nothing more).
    siblings = [dict(s) for e, s in keyed if e == experiment and "epochs" in dict(s)]
    mine = dict(settings)
    differing = [k for k in mine if any(s.get(k) != mine[k] for s in siblings)]
    label = experiment + (f" ({', '.join(f'{k}={json.loads(mine[k])}' for k in differing)})"
                          if differing else "")
    dataset = next((r.dataset for r in members if r.dataset), "")
    groups.append(Group(experiment, label, dataset, sorted(members, key=lambda r: (
        r.seed if r.seed is not None else -1, r.path))))
  return groups
