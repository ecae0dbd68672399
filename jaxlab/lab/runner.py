"""Running a lab: each (experiment, seed) as one ordinary run directory, by one or many workers.

  DIR/lab.json                 the lab, its settings, and every run's status and worker
  DIR/EXPERIMENT/seed_S/       a run directory, as `scripts/train.py` writes one

Runs are trained as `scripts/train.py --seeds=...` trains them: an experiment's seeds as one
vmapped group (`train_group`); in one process a data set is loaded once and an architecture's
steps are compiled once. A finished run is skipped, an interrupted one resumes, and a failing
one is recorded with its one-line error while the lab goes on.

Any number of workers (processes of `run_lab.py` on the same lab directory, on one machine or
on several sharing a file system) share the lab: each claims the next group nobody holds (the
run directories' locks, `jaxlab.rundir.lock`), trains it, and takes the next; a group held by another
worker is left to it, and taken (resumed) if that worker dies. lab.json is read, merged and
written under a lock of its own, each worker writing only the runs it has claimed.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import socket
import sys
import time
import traceback
from typing import Any, Callable, Sequence

from absl import logging

from jaxlab.rundir import lock
from jaxlab.training import process
from jaxlab.config import TrainConfig, changed_settings
from jaxlab.data import Dataset, load_dataset
from jaxlab.errors import BadValue, NonFiniteError, UserError, describe, one_line, output
from jaxlab.experiment import Lab, portable_path, resolve_config
from jaxlab.files import read_json, write_json
from jaxlab.rundir.run import CONFIG_FILE, SEED_FOLDERS, Run, folder_seed, seed_folder
from jaxlab.training.train import train_group

LAB_FILE = "lab.json"


def run_path(experiment: str, seed: int) -> str:
  """A run's directory, relative to the lab's."""
  return f"{experiment}/{seed_folder(seed)}"


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def plan_lab(lab: Lab, workdir: str | pathlib.Path, experiments: Sequence[str] | None,
             seeds: Sequence[int], overrides: dict[str, Any]) -> list[Run]:
  """The lab's runs in `workdir`, experiment by experiment in the lab's order, each config
  resolved (and checked) before anything is trained: a bad setting fails the lab at once."""
  chosen = list(lab.experiments) if not experiments else list(experiments)
  unknown = [name for name in chosen if name not in lab.experiments]
  if unknown:
    raise BadValue(f"experiment {unknown[0]!r} is not in lab {lab.name}; its experiments: "
                   f"{', '.join(lab.experiments)}")
  if len(set(chosen)) != len(chosen) or len(set(seeds)) != len(seeds):
    raise BadValue(f"each experiment and seed may be given once, got experiments {chosen} and "
                   f"seeds {list(seeds)}")
  if not seeds:
    raise BadValue("at least one seed is needed (--seeds=0,1,2)")
  root = pathlib.Path(workdir)
  return [Run(root / run_path(name, seed), resolve_config(name, **{**overrides, "seed": seed}),
              path=run_path(name, seed)) for name in chosen for seed in seeds]


class LabRunner:
  """Trains a planned lab into `workdir`, keeping DIR/lab.json current after every change."""

  def __init__(self, lab: Lab, workdir: str | pathlib.Path, runs: list[Run],
               settings: dict[str, Any], progress: bool | None = None,
               say: Callable[[str], None] | None = None, loop: str | None = None):
    self.lab, self.runs, self.settings, self.progress = lab, runs, settings, progress
    self.loop = loop  # How a compiled call runs its steps (`jaxlab.training.train.train_group`).
    self.root = pathlib.Path(workdir)
    if self.root.exists() and not self.root.is_dir():
      raise BadValue(f"--workdir {self.root} is a file, not a directory")
    worker = f"[worker {os.environ['JAXLAB_WORKER']}] " if os.environ.get("JAXLAB_WORKER") else ""
    self.say = say or (lambda line: print(worker + line, file=sys.stderr, flush=True))
    self._datasets: dict[tuple, Dataset | Exception] = {}
    self._others: list[dict[str, Any]] = []
    self._mine: set[str] = set()  # The runs this worker claimed (or found finished).
    self.trained_failed = False  # Whether a run this worker trained failed.
    self.started = _now()
    self.poll_seconds = 2.0  # How often to look at runs that other workers hold.
    self.me = {"host": socket.gethostname(), "pid": os.getpid(), "started": _now()}
    self._active = False  # Registered in lab.json's "workers" while it runs.
    self._last_out = False
    self._check_previous()

  def _check_previous(self) -> None:
    """A lab directory holds one lab with one set of settings; runs of other experiments or
    seeds that an earlier invocation recorded are kept in lab.json."""
    path = self.root / LAB_FILE
    if not path.is_file():
      return
    try:
      previous = json.loads(path.read_text())
      if not isinstance(previous, dict):
        raise ValueError(f"a JSON {type(previous).__name__}, not an object")
    except (OSError, ValueError) as e:
      # lab.json only summarizes the run directories, which say for themselves what they hold.
      self._others = self._runs_on_disk()
      self.say(f"warning: {path} cannot be read ({one_line(e)}); rebuilding it from the run "
               f"directories under {self.root}")
      return
    if previous.get("lab") != self.lab.name:
      raise BadValue(f"{self.root} holds lab {previous.get('lab')!r}, not {self.lab.name!r}; "
                     "use another --workdir")
    changed = changed_settings(previous.get("settings", {}), self.settings)
    if changed:
      raise BadValue(f"{self.root} holds lab {self.lab.name} with other settings "
                     f"({', '.join(changed)}); use another --workdir, or the same settings to "
                     "resume it")
    self.started = previous.get("started", self.started)
    mine = {r.path for r in self.runs}
    self._others = [r for r in previous.get("runs", []) if r.get("path") not in mine]

  def _runs_on_disk(self) -> list[dict[str, Any]]:
    """lab.json's records of the run directories under the lab's that this invocation did not
    plan (other experiments or seeds of an earlier one), as their own files tell them."""
    mine = {r.path for r in self.runs}
    found = []
    for config in sorted(self.root.glob(f"*/{SEED_FOLDERS}/{CONFIG_FILE}")):
      path = config.parent.relative_to(self.root).as_posix()
      run = Run.read(config.parent, path)
      if run is not None and path not in mine:
        found.append(run.lab_record())
    return found

  def write(self) -> dict[str, Any]:
    """lab.json, merged under its lock: this worker's claimed runs as it sees them, every
    other run as the file has it (another worker's), or as planned if the file has none."""
    with lock.waiting(self.root, "lab"):
      previous = read_json(self.root / LAB_FILE)
      found = {r.get("path"): r for r in previous.get("runs", [])}
      runs = [r.lab_record() if self._ours(r, found.get(r.path)) else found[r.path]
              for r in self.runs]
      mine = {r.path for r in self.runs}
      others = [r for r in previous.get("runs", []) if r.get("path") not in mine] or self._others
      record = {"lab": self.lab.name, "source": portable_path(self.lab.path),
                "settings": self.settings,
                "experiments": list(dict.fromkeys([*previous.get("experiments", []),
                                                   *(r.experiment for r in self.runs)])),
                "seeds": sorted({*previous.get("seeds", []), *(r.seed for r in self.runs)}),
                "questions": [q.to_json() for q in self.lab.questions],
                "started": previous.get("started", self.started), "updated": _now(),
                "workers": self._workers(previous.get("workers", [])), "runs": runs + others,
                **{k: previous[k] for k in ("rounds", "settled") if k in previous}}
      write_json(self.root / LAB_FILE, record)
    return record

  def _ours(self, run: Run, found: dict[str, Any] | None) -> bool:
    """Whether lab.json takes this worker's record of `run`: one it claimed, one the file does
    not have, or one found completed that the file still has running (its worker died)."""
    return (run.path in self._mine or found is None
            or (run.status == "completed" and found.get("status") != "completed"))

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
    vmapped group (`train_group`), each seed into its own run directory. A group that another
    worker holds is left to it; once every other group is done, this worker waits for those,
    and takes (resumes) any whose worker has died."""
    with output(self.root, "--workdir"):
      self.root.mkdir(parents=True, exist_ok=True)
    self._active = True
    self.write()
    try:
      self._run()
    finally:
      self._active = False
      record = self.write()
    return record

  def _run(self) -> None:
    numbers = {id(run): i for i, run in enumerate(self.runs, 1)}
    groups = [[r for r in self.runs if r.experiment == e]
              for e in dict.fromkeys(r.experiment for r in self.runs)]
    held_elsewhere = [g for g in groups if not self._claim(g, numbers)]
    if held_elsewhere:
      self.say(f"[{self.lab.name}] waiting for {sum(map(len, held_elsewhere))} runs that other "
               "workers hold (taken over if a worker dies)")
    while held_elsewhere:
      time.sleep(self.poll_seconds)
      if process.requested():
        raise process.Preempted(f"[{self.lab.name}] stopped while other workers train")
      held_elsewhere = [g for g in held_elsewhere if not self._claim(g, numbers, quiet=True)]

  @property
  def last_out(self) -> bool:
    """Whether this worker was the last of the lab's workers to end (it prints the table)."""
    return self._last_out

  def _workers(self, listed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """lab.json's active workers: `listed` without this one and without dead processes of this
    host (a SIGKILLed worker never signs off), and with this one while it runs."""
    def alive(w: dict[str, Any]) -> bool:
      if w.get("host") != self.me["host"]:
        return True  # Another machine's: taken at its word.
      try:
        os.kill(int(w["pid"]), 0)
      except (OSError, ValueError, KeyError, TypeError):
        return False
      return True

    others = [w for w in listed if isinstance(w, dict) and alive(w)
              and (w.get("host"), w.get("pid")) != (self.me["host"], self.me["pid"])]
    if not self._active:
      self._last_out = not others
    return others + [self.me] * self._active

  def _claim(self, runs: list[Run], numbers: dict[int, int], quiet: bool = False) -> bool:
    """Claims and trains `runs`' unfinished ones as a group; False where another worker holds
    one of them (nothing is done then)."""
    unfinished = [r for r in runs if not self._finished(r, numbers)]
    if not unfinished:
      return True
    try:
      with lock.holding(*[r.root for r in unfinished]):
        unfinished = [r for r in unfinished if not self._finished(r, numbers)]  # Meanwhile?
        if unfinished:
          self._train(unfinished, [numbers[id(r)] for r in unfinished])
    except lock.BusyError as e:
      if not quiet:
        self.say(f"{self._head([numbers[id(r)] for r in unfinished], unfinished)}: held by "
                 f"{lock.describe_holder(e.holder)}; left to it")
      return False
    return True

  def _finished(self, run: Run, numbers: dict[int, int]) -> bool:
    if run.path in self._mine and run.status in ("completed", "failed"):
      return True
    if run.finished(run.config):
      run.finish(Run.read(run.root).summary)
      self.write()
      self.say(f"{self._head([numbers[id(run)]], [run])}: finished earlier, skipped")
      return True
    return False

  def _train(self, group: list[Run], numbers: list[int]) -> None:
    """Trains one experiment's unfinished runs as a group, recording how it went."""
    head = self._head(numbers, group)
    if process.requested():
      raise process.Preempted(f"[{self.lab.name}] stopped before run {numbers[0]}/"
                              f"{len(self.runs)}")
    for run in group:
      run.claim({"host": socket.gethostname(), "pid": os.getpid()})
      self._mine.add(run.path)
    self.write()
    self.say(f"{head} -> {self.root / group[0].experiment}")
    t0 = time.perf_counter()
    try:
      summaries = train_group([r.config for r in group], [r.root for r in group],
                              dataset=self._dataset(group[0].config), progress=self.progress,
                              loop=self.loop)
    except process.Preempted as e:  # The lab stops; the runs resume next time.
      self.write()
      raise process.Preempted(f"{head}: {e}") from None
    except Exception as e:  # A failing group is recorded; the lab goes on.
      self.trained_failed = True
      for run in group:
        run.fail(describe(e))
      if not isinstance(e, (UserError, NonFiniteError)):  # A bug: its traceback.
        logging.error("%s failed:\n%s", head, traceback.format_exc())
      self.say(f"{head}: FAILED: {group[0].error}")
    else:
      seconds = time.perf_counter() - t0
      for i, run, summary in zip(numbers, group, summaries):
        run.finish(summary, seconds=seconds)
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


# ----------------------------------------------------------------------------- until settled


def settle(lab: Lab, workdir: str | pathlib.Path, experiments: Sequence[str], max_seeds: int,
           overrides: dict[str, Any], settings: dict[str, Any],
           make_runner: Callable[[list[Run]], LabRunner],
           say: Callable[[str], None]) -> dict[str, Any]:
  """Adds seeds, round by round, to the experiments of the lab's questions that the seeds so
  far cannot settle, until every comparison among `experiments` is settled or no more seeds
  (up to `max_seeds` per experiment) would settle it; returns lab.json's "settled" record.

  A round decides, from every completed run (the report's findings and their `seeds_needed`),
  which experiments need how many seeds: an unsettled comparison with fewer than two seeds on a
  side gets two; one whose seed count is within the budget gets that count; one whose spread
  comes from collapsed runs, or that no practical number would settle, or that needs more than
  the budget, stays open. The round (its seeds, their reasons) is recorded in lab.json before
  it trains and its verdicts after: a lab killed inside a round resumes that round, and
  another worker on the same lab joins it (the runs are claimed as any lab's are)."""
  root = pathlib.Path(workdir)
  while True:
    with lock.waiting(root, "lab"):  # One decision per round, whichever worker gets here.
      record = read_json(root / LAB_FILE)
      rounds = record.setdefault("rounds", [])
      if not rounds or rounds[-1]["status"] == "done":
        added, why, found = _next_round(root, experiments, max_seeds, record)
        record["settled"] = _standing(found, max_seeds, added)
        if rounds and rounds[-1].get("completed") == 0:  # Its runs all failed: not again.
          added = {}
          for entry in record["settled"]:
            if entry["why"].startswith("open: adding"):
              entry["why"] = FAILED
        if added:
          rounds.append({"round": len(rounds) + 1, "status": "running", "started": _now(),
                         "added": added, "why": why})
        write_json(root / LAB_FILE, record)
      current = rounds[-1] if rounds and rounds[-1]["status"] == "running" else None
    if current is None:
      return record["settled"]
    say(f"[{lab.name}] round {current['round']}: adding seeds " + "; ".join(
        f"{name} {','.join(map(str, seeds))}" for name, seeds in current["added"].items()))
    runs = [r for name, seeds in current["added"].items()
            for r in plan_lab(lab, root, [name], seeds, overrides)]
    make_runner(runs).run()
    with lock.waiting(root, "lab"):
      record = read_json(root / LAB_FILE)
      this = record["rounds"][current["round"] - 1]
      if this["status"] != "done":
        found = _comparisons(root, experiments)
        completed = sum(getattr(Run.read(r.root), "status", None) == "completed" for r in runs)
        this.update(status="done", ended=_now(), completed=completed,
                    verdicts=[_verdict(c) for c in found])
        write_json(root / LAB_FILE, record)


def _comparisons(root: pathlib.Path, experiments: Sequence[str]) -> list[dict[str, Any]]:
  """The lab's comparisons among `experiments`, answered from every completed run under
  `root` (the report's findings)."""
  from jaxlab.report.build import experiment_rows, study
  from jaxlab.report.runs import find_runs
  collection = find_runs(root)
  found = study(collection, experiment_rows(collection))
  return [c for q in found["questions"] for c in q["comparisons"]
          if c["experiment"] in experiments and c["against"] in experiments]


def _next_round(root: pathlib.Path, experiments: Sequence[str], max_seeds: int,
                record: dict[str, Any]
                ) -> tuple[dict[str, list[int]], list[dict[str, Any]], list[dict[str, Any]]]:
  """The seeds the next round adds ({experiment: seeds}), why, and the comparisons now. An
  experiment's seeds so far are every seed it has a run of, completed or not (a failed seed is
  never added again); the comparisons count the completed ones."""
  found = _comparisons(root, experiments)
  seeds = _seeds_taken(root, record)
  wanted: dict[str, int] = {}
  why = []
  for c in found:
    n, _ = _asks(c, max_seeds)
    if n is None:
      continue
    for name in (c["experiment"], c["against"]):
      wanted[name] = max(wanted.get(name, 0), n)
    why.append({"comparison": f"{c['experiment']} - {c['against']}", "had": c["n"],
                "seeds_needed": n})
  added = {}
  for name, n in wanted.items():
    have = seeds.get(name, [])
    start = max(have, default=-1) + 1
    if len(have) < n:
      added[name] = list(range(start, start + n - len(have)))
  return added, why, found


def _seeds_taken(root: pathlib.Path, record: dict[str, Any]) -> dict[str, list[int]]:
  """Each experiment's seeds that have a run, in any state: a run directory under `root`
  (run_path's layout), or an entry of lab.json's runs (a run that failed before writing one)."""
  found: dict[str, set[int]] = {}
  for config in root.glob(f"*/{SEED_FOLDERS}/{CONFIG_FILE}"):
    found.setdefault(config.parent.parent.name, set()).add(folder_seed(config.parent.name))
  for run in record.get("runs", []):
    if isinstance(run.get("seed"), int):
      found.setdefault(run.get("experiment"), set()).add(run["seed"])
  return {k: sorted(v) for k, v in found.items()}


def _verdict(c: dict[str, Any]) -> dict[str, Any]:
  from jaxlab.report.findings import settled
  return {"comparison": f"{c['experiment']} - {c['against']}", "seeds": c["n"],
          "difference": c["difference"], "p_holm": c["p_holm"], "settled": settled(c),
          "seeds_needed": c["seeds_needed"]}


FAILED = "open: the runs of the seeds it asked for failed (see the runs' errors)"


def _asks(c: dict[str, Any], max_seeds: int) -> tuple[int | None, str]:
  """The seeds per experiment comparison `c` asks for (None where it asks none: settled, or
  open for a reason more seeds within `max_seeds` cannot mend), and where it stands: an
  unsettled comparison with fewer than two seeds on a side asks two, one whose count is within
  the budget and above what it has asks that count."""
  from jaxlab.report.findings import settled
  if settled(c):
    return None, "settled"
  if c["collapsed"]:
    return None, "open: its spread comes from collapsed runs"
  n = 2 if min(c["n"]) < 2 else c["seeds_needed"]
  if n is None:
    return None, "open: no practical number of seeds would settle it"
  if n > max_seeds:
    return None, f"open: needs about {n} seeds each, over the budget of {max_seeds}"
  if n <= min(c["n"]):
    return None, "open: the seeds the estimate asked for did not settle it"
  return n, f"open: adding seeds (about {n} each)"


def _standing(found: list[dict[str, Any]], max_seeds: int, added: dict[str, list[int]]
              ) -> list[dict[str, Any]]:
  """Where each comparison stands (`_asks`); one that asks for seeds that were not added had
  them already, and they failed."""
  standing = []
  for c in found:
    n, why = _asks(c, max_seeds)
    if n is not None and c["experiment"] not in added and c["against"] not in added:
      why = FAILED
    standing.append({**_verdict(c), "why": why})
  return standing
