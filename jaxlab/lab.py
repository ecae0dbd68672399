"""Running a lab: each (experiment, seed) as one ordinary run directory, all in one process.

  DIR/lab.json                 the lab, its settings, and every run's status
  DIR/EXPERIMENT/seed_S/       a run directory, as `scripts/train.py` writes one

Runs are trained as `scripts/train.py --seeds=...` trains them: an experiment's seeds as one
vmapped group (`train_group`); in one process a data set is loaded once and an architecture's
steps are compiled once. A finished run is skipped, an interrupted one resumes, and a failing
one is recorded with its one-line error while the lab goes on.
"""

from __future__ import annotations

import datetime
import json
import pathlib
import sys
import time
import traceback
from typing import Any, Callable, Sequence

from absl import logging

from jaxlab import preemption
from jaxlab.config import TrainConfig, changed_settings
from jaxlab.data import Dataset, load_dataset
from jaxlab.errors import USER_ERRORS, describe
from jaxlab.experiment import Lab, resolve_config
from jaxlab.metrics import write_json
from jaxlab.run import Run
from jaxlab.train import train_group

LAB_FILE = "lab.json"


def run_path(experiment: str, seed: int) -> str:
  """A run's directory, relative to the lab's."""
  return f"{experiment}/seed_{seed}"


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def plan_lab(lab: Lab, workdir: str | pathlib.Path, experiments: Sequence[str] | None,
             seeds: Sequence[int], overrides: dict[str, Any]) -> list[Run]:
  """The lab's runs in `workdir`, experiment by experiment in the lab's order, each config
  resolved (and checked) before anything is trained: a bad setting fails the lab at once."""
  chosen = list(lab.experiments) if not experiments else list(experiments)
  unknown = [name for name in chosen if name not in lab.experiments]
  if unknown:
    raise ValueError(f"experiment {unknown[0]!r} is not in lab {lab.name}; its experiments: "
                     f"{', '.join(lab.experiments)}")
  if len(set(chosen)) != len(chosen) or len(set(seeds)) != len(seeds):
    raise ValueError(f"each experiment and seed may be given once, got experiments {chosen} and "
                     f"seeds {list(seeds)}")
  if not seeds:
    raise ValueError("at least one seed is needed (--seeds=0,1,2)")
  root = pathlib.Path(workdir)
  return [Run(root / run_path(name, seed), resolve_config(name, **{**overrides, "seed": seed}),
              path=run_path(name, seed)) for name in chosen for seed in seeds]


class LabRunner:
  """Trains a planned lab into `workdir`, keeping DIR/lab.json current after every change."""

  def __init__(self, lab: Lab, workdir: str | pathlib.Path, runs: list[Run],
               settings: dict[str, Any], progress: bool | None = None,
               say: Callable[[str], None] | None = None):
    self.lab, self.runs, self.settings, self.progress = lab, runs, settings, progress
    self.root = pathlib.Path(workdir)
    if self.root.exists() and not self.root.is_dir():
      raise ValueError(f"--workdir {self.root} is a file, not a directory")
    self.say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    self._datasets: dict[tuple, Dataset | Exception] = {}
    self._others: list[dict[str, Any]] = []
    self.started = _now()
    self._check_previous()

  def _check_previous(self) -> None:
    """A lab directory holds one lab with one set of settings; runs of other experiments or
    seeds that an earlier invocation recorded are kept in lab.json."""
    path = self.root / LAB_FILE
    if not path.is_file():
      return
    previous = json.loads(path.read_text())
    if previous.get("lab") != self.lab.name:
      raise ValueError(f"{self.root} holds lab {previous.get('lab')!r}, not {self.lab.name!r}; "
                       "use another --workdir")
    changed = changed_settings(previous.get("settings", {}), self.settings)
    if changed:
      raise ValueError(f"{self.root} holds lab {self.lab.name} with other settings "
                       f"({', '.join(changed)}); use another --workdir, or the same settings to "
                       "resume it")
    self.started = previous.get("started", self.started)
    mine = {r.path for r in self.runs}
    self._others = [r for r in previous.get("runs", []) if r.get("path") not in mine]

  def write(self) -> dict[str, Any]:
    record = {"lab": self.lab.name, "source": self.lab.path, "settings": self.settings,
              "experiments": list(dict.fromkeys(r.experiment for r in self.runs)),
              "seeds": list(dict.fromkeys(r.seed for r in self.runs)),
              "started": self.started, "updated": _now(),
              "runs": [r.lab_record() for r in self.runs] + self._others}
    write_json(self.root / LAB_FILE, record)
    return record

  def _dataset(self, config: TrainConfig) -> Dataset:
    key = (config.dataset, config.data_dir, config.download)
    if key not in self._datasets:
      try:
        self._datasets[key] = load_dataset(config.dataset, data_dir=config.data_dir,
                                           download=config.download)
      except Exception as e:  # Every run of a missing data set fails alike, without retrying.
        self._datasets[key] = e
    found = self._datasets[key]
    if isinstance(found, Exception):
      raise found
    return found

  def run(self) -> dict[str, Any]:
    """Trains the lab experiment by experiment: an experiment's unfinished seeds as one
    vmapped group (`train_group`), each seed into its own run directory."""
    self.root.mkdir(parents=True, exist_ok=True)
    self.write()
    numbers = {id(run): i for i, run in enumerate(self.runs, 1)}
    for experiment in dict.fromkeys(r.experiment for r in self.runs):
      group = []
      for run in (r for r in self.runs if r.experiment == experiment):
        if run.finished(run.config):
          self._completed(run, Run.read(run.root).summary)
          self.say(f"{self._head([numbers[id(run)]], [run])}: finished earlier, skipped")
        else:
          group.append(run)
      self.write()
      if group:
        self._train(group, [numbers[id(run)] for run in group])
    return self.write()

  def _train(self, group: list[Run], numbers: list[int]) -> None:
    """Trains one experiment's unfinished runs as a group, recording how it went."""
    head = self._head(numbers, group)
    if preemption.requested():
      raise preemption.Preempted(f"[{self.lab.name}] stopped before run {numbers[0]}/"
                                 f"{len(self.runs)}")
    for run in group:
      run.status, run.error = "running", None
    self.write()
    self.say(f"{head} -> {self.root / group[0].experiment}")
    t0 = time.perf_counter()
    try:
      summaries = train_group([r.config for r in group], [r.root for r in group],
                              dataset=self._dataset(group[0].config), progress=self.progress)
    except preemption.Preempted as e:  # The lab stops; the runs resume next time.
      self.write()
      raise preemption.Preempted(f"{head}: {e}") from None
    except Exception as e:  # A failing group is recorded; the lab goes on.
      for run in group:
        run.status, run.error = "failed", describe(e)
      if not isinstance(e, USER_ERRORS):
        logging.error("%s failed:\n%s", head, traceback.format_exc())
      self.say(f"{head}: FAILED: {group[0].error}")
    else:
      seconds = time.perf_counter() - t0
      for i, run, summary in zip(numbers, group, summaries):
        self._completed(run, summary)
        run.seconds = seconds
        self.say(f"{self._head([i], [run])}: final validation accuracy "
                 f"{summary['final_val_accuracy']:.4f} (best {summary['best_val_accuracy']:.4f})")
      self.say(f"{head}: {seconds:.2f} s")
    self.write()

  def _head(self, numbers: list[int], runs: list[Run]) -> str:
    """`[lab] run 3/8: exp seed 0`, or `[lab] runs 3-4/8: exp seeds 0,1` for a group."""
    n = len(self.runs)
    if len(runs) == 1:
      return f"[{self.lab.name}] run {numbers[0]}/{n}: {runs[0].experiment} seed {runs[0].seed}"
    span = f"{numbers[0]}-{numbers[-1]}" if numbers == list(range(numbers[0], numbers[-1] + 1)) \
        else ",".join(map(str, numbers))
    return (f"[{self.lab.name}] runs {span}/{n}: {runs[0].experiment} seeds "
            f"{','.join(str(r.seed) for r in runs)}")

  @staticmethod
  def _completed(run: Run, summary: dict[str, Any]) -> None:
    run.status, run.error, run.summary = "completed", None, summary
