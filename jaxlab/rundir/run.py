"""One run: its directory and files, its settings, its identity, its history and its status.

  ROOT/config.json           settings, where the experiment comes from, layer plan, data, machine
  ROOT/metrics.jsonl         one record per finished epoch
  ROOT/metrics.json          the summary: status, accuracies, timings, and the final evaluation
  ROOT/checkpoints/          step_NNNNNNNNN.msgpack (the newest few) and best.msgpack
  ROOT/tensorboard/          event files

A `Run` is the one record of a run: the training loop's hooks write through it, a lab tracks
its runs' status with it, and the report reads run directories into it. It imports nothing of
JAX. Its `identity` is what each of its checkpoints says about itself (experiment, settings,
layer plan, versions), so that a checkpoint of another run is refused, naming the difference.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import pathlib
import re
import shutil
import statistics
from typing import Any

import jaxlab
from jaxlab.config import RESUMABLE_CHANGES, TrainConfig, changed_settings
from jaxlab.errors import BadValue, CheckpointError, DataError, MissingFile
from jaxlab.files import json_problem, read_json, read_jsonl

CHECKPOINTS = ("last", "best")
# The record the best checkpoint is chosen on: the highest validation accuracy (the first
# epoch that reaches it).
BEST_ON = "val_accuracy"
# The metrics of a run whose config.json does not list them (`jaxlab.metrics.BUILTIN`).
BUILTIN_METRICS = {"loss": {"higher_is_better": False}, "accuracy": {"higher_is_better": True}}


def best_record(history: list[dict[str, Any]]) -> dict[str, Any] | None:
  """The epoch record of the best checkpoint: the first with the highest `BEST_ON` (records
  where it is missing, an epoch whose steps were all skipped, never are)."""
  scored = [r for r in history if r.get(BEST_ON) is not None]
  return max(scored, key=lambda r: r[BEST_ON]) if scored else None
RESTART_HINT = "pass --restart to discard this run's checkpoints and train from scratch"
_STEP_FILE = re.compile(r"step_(\d+)\.msgpack")
CONFIG_FILE = "config.json"  # What makes a folder a run directory.


def _digest(obj: Any) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


@functools.cache
def _jax_version() -> str:
  return importlib.metadata.version("jax")  # Without importing JAX.


def step_of(path: pathlib.Path) -> int:
  """The train step a step checkpoint's name gives."""
  return int(_STEP_FILE.fullmatch(path.name).group(1))


SEED_FOLDERS = "seed_*"  # The glob of seed_folder's names.


def seed_folder(seed: int) -> str:
  """The folder of one seed's run among a group's or a lab's: `seed_S`."""
  return f"seed_{seed}"


def folder_seed(name: str) -> int:
  """The seed of a `seed_folder` name."""
  return int(name.removeprefix("seed_"))


def member_path(workdir: str | os.PathLike, seed: int | None = None,
                learning_rate: float | None = None) -> pathlib.Path:
  """A group member's run directory: WORKDIR/seed_S, WORKDIR/lr_R or WORKDIR/lr_R/seed_S (WORKDIR
  itself for a single run)."""
  path = pathlib.Path(workdir)
  if learning_rate is not None:
    path = path / f"lr_{learning_rate:g}"
  return path / seed_folder(seed) if seed is not None else path


def runs_within(workdir: str | os.PathLike) -> list[pathlib.Path]:
  """The run directories in `workdir` and one or two levels below it, in order: a run's own, a
  group's members (WORKDIR/seed_S, WORKDIR/lr_R, WORKDIR/lr_R/seed_S), a lab's runs
  (WORKDIR/EXPERIMENT/seed_S)."""
  root = pathlib.Path(workdir)
  return [p.parent for p in [root / CONFIG_FILE, *sorted(root.glob(f"*/{CONFIG_FILE}")),
                             *sorted(root.glob(f"*/*/{CONFIG_FILE}"))] if p.is_file()]


def member_dir(workdir: str | os.PathLike, config: TrainConfig, by_seed: bool,
               by_rate: bool) -> pathlib.Path:
  """`member_path` of `config`, for a group over seeds, learning rates or both."""
  return member_path(workdir, config.seed if by_seed else None,
                     config.learning_rate if by_rate else None)


class Run:
  """A run directory and what is known of the run in it.

  `settings` are the resolved settings as config.json holds them (`config` is the same as a
  `TrainConfig`); a run that a lab expects but that never wrote config.json has only
  `experiment`, `seed`, `dataset` and `epochs` there. `path` is its name in a lab or report
  (relative to that folder); `label` its name in a group's log lines (`seed_3`).

  A run changes only through its methods: what config.json says of it (`describe`), where it
  resumes (`resume_at`), each epoch it finishes (`record_epoch`), and how it ends or stands in
  a lab (`claim`, `fail`, `finish`). Everything else is read.
  """

  def __init__(self, root: str | pathlib.Path, config: TrainConfig | None = None, *,
               settings: dict[str, Any] | None = None, path: str = "", label: str = "",
               status: str = "pending", error: str | None = None):
    self.root = pathlib.Path(root)
    self.settings = dict(config.to_json() if config is not None else settings or {})
    self._config = config
    self.path, self.label, self.status, self.error = path, label, status, error
    self.history: list[dict[str, Any]] = []
    self.summary: dict[str, Any] = {}
    self.about: dict[str, Any] = {}
    self.architecture: dict[str, Any] = {}
    self.data: dict[str, Any] = {}
    self.environment: dict[str, Any] = {}
    self.on_disk = False  # Whether config.json was read from `root`.
    self.seconds: float | None = None  # Training time, as a lab measured it.
    self.worker: dict[str, Any] | None = None  # The process that trained it, in a lab.
    self.start_step = 0
    self.steps_per_epoch = 0
    self.start_epoch = 0  # The epochs done (trained and validated) before this process's.
    self.counts: dict[str, int] = {}
    # Each metric it records (train_<name>, val_<name>) and its direction (`jaxlab.metrics`).
    self.metrics: dict[str, dict[str, Any]] = dict(BUILTIN_METRICS)

  def __repr__(self) -> str:
    return f"Run({str(self.root)!r}, {self.experiment!r}, seed={self.seed}, {self.status})"

  # --------------------------------------------------------------------------- settings

  @property
  def config(self) -> TrainConfig:
    if self._config is None:
      self._config = TrainConfig.from_json(self.settings)
    return self._config

  @property
  def experiment(self) -> str:
    return self.settings.get("experiment", "?")

  @property
  def seed(self) -> int | None:
    return self.settings.get("seed")

  @property
  def dataset(self) -> str:
    return self.settings.get("dataset", "")

  @property
  def epochs(self) -> int | None:
    return self.settings.get("epochs")

  # --------------------------------------------------------------------------- files

  @property
  def config_file(self) -> pathlib.Path:
    return self.root / CONFIG_FILE

  @property
  def metrics_jsonl(self) -> pathlib.Path:
    return self.root / "metrics.jsonl"

  @property
  def metrics_json(self) -> pathlib.Path:
    return self.root / "metrics.json"

  @property
  def checkpoints(self) -> pathlib.Path:
    return self.root / "checkpoints"

  @property
  def best(self) -> pathlib.Path:
    return self.checkpoints / "best.msgpack"

  @property
  def tensorboard(self) -> pathlib.Path:
    return self.root / "tensorboard"

  def step_checkpoint(self, step: int) -> pathlib.Path:
    return self.checkpoints / f"step_{step:09d}.msgpack"

  def step_checkpoints(self) -> list[pathlib.Path]:
    """Every step checkpoint, newest first."""
    found = ([p for p in self.checkpoints.iterdir() if _STEP_FILE.fullmatch(p.name)]
             if self.checkpoints.is_dir() else [])
    return sorted(found, key=step_of, reverse=True)

  @property
  def last(self) -> pathlib.Path:
    """The newest checkpoint's file (step 0's name, not yet written, if there is none)."""
    newest = self.step_checkpoints()
    return newest[0] if newest else self.step_checkpoint(0)

  def checkpoint(self, which: str) -> pathlib.Path:
    if which not in CHECKPOINTS:
      raise BadValue(f"unknown checkpoint {which!r}; known: {', '.join(CHECKPOINTS)}")
    return self.best if which == "best" else self.last

  def prepare(self) -> None:
    """Creates the run directory, failing clearly where it is a file or cannot be written."""
    if self.root.exists() and not self.root.is_dir():
      raise BadValue(f"--workdir {self.root} is a file, not a directory")
    try:
      self.root.mkdir(parents=True, exist_ok=True)
      probe = self.root / f".write-test-{os.getpid()}"
      probe.write_bytes(b"")
      probe.unlink()
    except OSError as e:
      raise BadValue(f"--workdir {self.root} cannot be written: {e.strerror or e}") from None

  def clear(self) -> None:
    """Removes what a run wrote (for a restart from scratch); other files are left alone."""
    for path in (self.config_file, self.metrics_jsonl, self.metrics_json):
      path.unlink(missing_ok=True)
    for directory in (self.checkpoints, self.tensorboard):
      shutil.rmtree(directory, ignore_errors=True)

  # --------------------------------------------------------------------------- reading

  @classmethod
  def read(cls, root: str | pathlib.Path, path: str = "") -> Run | None:
    """The run in directory `root` as its files tell it (None where there is no readable
    config.json): settings, description, history, summary and status (`completed` once the
    final evaluation is in metrics.json, `imported` for imported weights, else `running`)."""
    root = pathlib.Path(root)
    saved = read_json(root / CONFIG_FILE)
    if not isinstance(saved.get("config"), dict):
      return None
    run = cls(root, settings=saved["config"], path=path)
    run.on_disk = True
    run.about = saved.get("experiment", {})
    run.architecture = saved.get("model", {})
    run.data = saved.get("data", {})
    run.environment = saved.get("environment", {})
    run.metrics = saved.get("metrics") or dict(BUILTIN_METRICS)
    run.summary = read_json(root / "metrics.json")
    run.history = read_jsonl(root / "metrics.jsonl")
    state = run.summary.get("status")
    run.status = ("completed" if state == "completed" and "evaluation" in run.summary
                  else "imported" if state == "imported" else "running")
    return run

  @classmethod
  def open(cls, root: str | pathlib.Path) -> Run:
    """`read`, failing with a message naming the directory where it holds no run, and saying
    whether its config.json is missing or damaged."""
    run = cls.read(root)
    if run is None:
      problem = json_problem(pathlib.Path(root) / CONFIG_FILE)
      if problem == "missing":
        raise MissingFile(f"{root} is not a run directory: it has no config.json")
      raise DataError(f"{root}/config.json is damaged ({problem or 'no settings in it'}); "
                      "restore it, or train into another --workdir")
    return run

  def check_resume(self, config: TrainConfig) -> None:
    """Refuses to resume a run whose saved settings compute something else than `config`."""
    changed = changed_settings(Run.open(self.root).settings, config.to_json())
    if changed:
      raise BadValue(f"{self.root} holds a run with a different configuration "
                     f"({', '.join(changed)}); use another --workdir, or the same settings to "
                     "resume it")

  def finished(self, config: TrainConfig) -> bool:
    """Whether the directory holds `config` trained to the end (so it need not be touched)."""
    found = Run.read(self.root)
    return (found is not None and not changed_settings(found.settings, config.to_json())
            and found.status == "completed"
            and found.summary.get("epochs_completed", 0) >= config.epochs)

  # --------------------------------------------------------------------------- identity

  @property
  def identity(self) -> dict[str, Any]:
    """What each checkpoint of this run says about itself (its position is added when it is
    saved): the experiment, the settings that decide what is computed and the layer plan, each
    with a hash, and the versions that wrote it."""
    settings = {k: v for k, v in self.settings.items() if k not in RESUMABLE_CHANGES}
    return {"experiment": self.experiment, "config": settings, "config_hash": _digest(settings),
            "architecture": self.architecture, "architecture_hash": _digest(self.architecture),
            "computes": self.environment.get("computes"),
            "jaxlab": jaxlab.__version__, "jax": _jax_version()}

  def check_checkpoint(self, meta: dict[str, Any], path: pathlib.Path) -> None:
    """Refuses a checkpoint of another experiment, configuration or architecture, naming both."""
    expected = self.identity
    if meta["experiment"] != expected["experiment"]:
      raise CheckpointError(
          f"checkpoint {path} belongs to experiment {meta['experiment']!r} (config "
          f"{meta.get('config_hash')}), not to this run's {expected['experiment']!r} (config "
          f"{expected['config_hash']}); {RESTART_HINT}")
    if meta.get("config_hash") != expected["config_hash"]:
      changed = changed_settings(meta.get("config", {}), expected["config"])
      raise CheckpointError(
          f"checkpoint {path} was written with another configuration of {meta['experiment']!r} "
          f"(config {meta.get('config_hash')} -> {expected['config_hash']}: "
          f"{', '.join(changed)}); {RESTART_HINT}")
    if meta.get("computes") and expected["computes"] and meta["computes"] != expected["computes"]:
      raise CheckpointError(  # bf16 computes otherwise on a GPU than on a CPU.
          f"checkpoint {path} was trained computing in {meta['computes']!r}; here it would go on "
          f"in {expected['computes']!r} (another backend); resume it where it was trained, or "
          f"{RESTART_HINT}")
    if meta.get("architecture_hash") != expected["architecture_hash"]:
      raise CheckpointError(
          f"checkpoint {path} was written for another architecture of {meta['experiment']!r} "
          f"(its declaration changed since: "
          f"{_architecture_change(meta.get('architecture', {}), expected['architecture'])}); "
          f"{RESTART_HINT}")

  # --------------------------------------------------------------------------- changes

  def describe(self, *, about: dict[str, Any] | None = None,
               architecture: dict[str, Any] | None = None, data: dict[str, Any] | None = None,
               environment: dict[str, Any] | None = None,
               counts: dict[str, int] | None = None,
               metrics: dict[str, dict[str, Any]] | None = None) -> None:
    """What config.json says of the run (where its experiment comes from, its architecture, its
    data, the environment it trains in, its metrics) and its parameter counts: those given."""
    for name, value in (("about", about), ("architecture", architecture), ("data", data),
                        ("environment", environment), ("counts", counts),
                        ("metrics", metrics)):
      if value is not None:
        setattr(self, name, dict(value))

  def validated_through(self, step: int, steps_per_epoch: int) -> int:
    """The epochs a resume from global step `step` keeps as done: those the step has trained
    through, but not the last at an epoch's end whose record metrics.jsonl lacks (the run
    stopped in that epoch's validation, which the resume does again)."""
    trained = step // steps_per_epoch if steps_per_epoch else 0
    if trained and step % steps_per_epoch == 0 and not any(
        r.get("epoch") == trained for r in read_jsonl(self.metrics_jsonl)):
      return trained - 1
    return trained

  def resume_at(self, step: int, steps_per_epoch: int, epochs_done: int) -> None:
    """Training (re)starts after global step `step`, of `steps_per_epoch` an epoch, with
    `epochs_done` epochs trained and validated (`validated_through`): the history keeps those
    (the epochs logged after the checkpoint it resumes from are trained again)."""
    self.start_step, self.steps_per_epoch, self.start_epoch = step, steps_per_epoch, epochs_done
    self.history = [r for r in read_jsonl(self.metrics_jsonl) if r["epoch"] <= epochs_done]

  def record_epoch(self, record: dict[str, Any]) -> None:
    """A finished epoch's record (its metrics.jsonl line)."""
    self.history.append(record)

  def claim(self, worker: dict[str, Any]) -> None:
    """A lab's worker (host, process) starts training it."""
    self.status, self.error, self.worker = "running", None, worker

  def fail(self, error: str | None) -> None:
    self.status, self.error = "failed", error

  def finish(self, summary: dict[str, Any], status: str = "completed",
             seconds: float | None = None) -> None:
    """Done (`completed`, or `imported` weights), with metrics.json's `summary` and, in a lab,
    the `seconds` it took."""
    self.status, self.error, self.summary = status, None, summary
    if seconds is not None:
      self.seconds = seconds

  # --------------------------------------------------------------------------- what it wrote

  def description(self) -> dict[str, Any]:
    """config.json's contents: the settings, where the experiment comes from, the architecture,
    the data, the environment it trained in and its metrics."""
    return {"config": self.settings, "experiment": self.about, "model": self.architecture,
            "data": self.data, "environment": self.environment, "metrics": self.metrics}

  def summarize(self, status: str, evaluations: dict[str, Any] | None = None,
                last: pathlib.Path | None = None,
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """metrics.json's contents from the epochs' records (and keeps them as `summary`): final
    and best accuracy, timings, checkpoints (`last`: the newest checkpoint, if it may still be
    being written), `extra` fields and the final `evaluations`."""
    history, last = self.history, last or self.last
    final = history[-1] if history else {}
    best = best_record(history) or {}
    out = {
        "experiment": self.experiment, "dataset": self.dataset, "status": status,
        "epochs_completed": len(history), "epochs": self.epochs,
        **{f"final_val_{name}": final.get(f"val_{name}") for name in self.metrics},
        "best_val_accuracy": best.get(BEST_ON), "best_epoch": best.get("epoch"),
        **self.counts,  # total_params, trainable_params, non_trainable_params
        "total_seconds": sum(r["epoch_seconds"] + r["eval_seconds"] for r in history),
        "median_epoch_seconds": (statistics.median(r["epoch_seconds"] for r in history)
                                 if history else None),
        "checkpoints": {"last": str(last.relative_to(self.root)),
                        "best": str(self.best.relative_to(self.root))},
        **(extra or {}),
    }
    if evaluations:
      out["evaluation"] = evaluations
    self.summary = out
    return out

  # --------------------------------------------------------------------------- in a lab

  def lab_record(self) -> dict[str, Any]:
    """Its entry in lab.json."""
    out = {"experiment": self.experiment, "seed": self.seed, "dataset": self.dataset,
           "epochs": self.epochs, "path": self.path, "status": self.status}
    for key in ("error", "seconds", "worker"):
      if getattr(self, key) is not None:
        out[key] = getattr(self, key)
    for key in ("final_val_accuracy", "best_val_accuracy"):
      if self.summary.get(key) is not None:
        out[key] = self.summary[key]
    return out

  def note(self) -> str:
    """What became of a run that is not among a report's numbers."""
    if self.status == "failed":
      return f"failed: {self.error}"
    if self.status == "missing":
      return "missing: no run directory yet"
    return (f"running or interrupted: {len(self.history)} of {self.epochs} epochs done"
            if self.status == "running" else self.status)


def _architecture_change(old: dict[str, Any], new: dict[str, Any]) -> str:
  """The first difference between two layer plans, in words."""
  old_layers, new_layers = old.get("layers", []), new.get("layers", [])
  for a, b in zip(old_layers, new_layers):
    if a != b:
      keys = [k for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k)]
      return f"layer {a.get('name')!r}: " + ", ".join(f"{k} {a.get(k)!r} -> {b.get(k)!r}"
                                                       for k in keys)
  if len(old_layers) != len(new_layers):
    return f"{len(old_layers)} layers -> {len(new_layers)}"
  keys = [k for k in dict.fromkeys([*old, *new]) if old.get(k) != new.get(k)]
  return ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys)
