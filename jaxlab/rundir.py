"""Run directories: their files, the run's bookkeeping (config.json, metrics.json), and
rebuilding a run's model and state from the directory alone."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import shutil
import statistics
from typing import Any

import jax
from absl import logging
from flax import serialization

import jaxlab
from jaxlab import checkpoint, metrics
from jaxlab.config import RESUMABLE_CHANGES, TrainConfig, build_model, changed_settings, validate
from jaxlab.experiment import describe_experiment, get_experiment
from jaxlab.models import PlanModel, describe
from jaxlab.optim import make_optimizer
from jaxlab.state import create_train_state
from jaxlab.steps import train_sums_zeros
from jaxlab.summary import summarize

CHECKPOINTS = ("last", "best")
_STEP_FILE = re.compile(r"step_(\d+)\.msgpack")


class RunDir:
  """The files of a run directory (see the README's table).

  Checkpoints: `checkpoints/step_NNNNNNNNN.msgpack` at train step N (the newest
  `keep_checkpoints` of them are kept; "last" is the newest), and `checkpoints/best.msgpack`.
  A `checkpoints/last.msgpack` of the first format still counts as the oldest."""

  def __init__(self, workdir: str | pathlib.Path):
    self.root = pathlib.Path(workdir)
    self.config = self.root / "config.json"
    self.metrics_jsonl = self.root / "metrics.jsonl"
    self.metrics_json = self.root / "metrics.json"
    self.checkpoints = self.root / "checkpoints"
    self.best = self.checkpoints / "best.msgpack"
    self.tensorboard = self.root / "tensorboard"

  def step_checkpoint(self, step: int) -> pathlib.Path:
    return self.checkpoints / f"step_{step:09d}.msgpack"

  def step_checkpoints(self) -> list[pathlib.Path]:
    """Every step checkpoint, newest first (then a first-format last.msgpack)."""
    found = []
    if self.checkpoints.is_dir():
      for path in self.checkpoints.iterdir():
        match = _STEP_FILE.fullmatch(path.name)
        if match:
          found.append((int(match.group(1)), path))
    legacy = self.checkpoints / "last.msgpack"
    return [p for _, p in sorted(found, reverse=True)] + ([legacy] if legacy.is_file() else [])

  @property
  def last(self) -> pathlib.Path:
    """The newest checkpoint's file (a name that does not exist yet if there is none)."""
    newest = self.step_checkpoints()
    return newest[0] if newest else self.checkpoints / "last.msgpack"

  def checkpoint(self, which: str) -> pathlib.Path:
    if which not in CHECKPOINTS:
      raise ValueError(f"unknown checkpoint {which!r}; known: {', '.join(CHECKPOINTS)}")
    return self.best if which == "best" else self.last

  def prepare(self) -> None:
    """Creates the run directory, failing clearly where it is a file or cannot be written."""
    if self.root.exists() and not self.root.is_dir():
      raise ValueError(f"--workdir {self.root} is a file, not a directory")
    try:
      self.root.mkdir(parents=True, exist_ok=True)
      probe = self.root / f".write-test-{os.getpid()}"
      probe.write_bytes(b"")
      probe.unlink()
    except OSError as e:
      raise ValueError(f"--workdir {self.root} cannot be written: {e.strerror or e}") from None

  def clear(self) -> None:
    """Removes what a run wrote (for a restart from scratch); other files are left alone."""
    for path in (self.config, self.metrics_jsonl, self.metrics_json):
      path.unlink(missing_ok=True)
    for directory in (self.checkpoints, self.tensorboard):
      shutil.rmtree(directory, ignore_errors=True)

  def read_config(self) -> TrainConfig:
    """The run's resolved configuration, from config.json."""
    if not self.config.is_file():
      raise FileNotFoundError(f"{self.root} is not a run directory: it has no config.json")
    saved = json.loads(self.config.read_text())
    config = TrainConfig(**saved["config"])
    validate(config)
    # An experiment of a user's lab file: load that file, so the name means what it meant.
    get_experiment(config.experiment, saved.get("experiment", {}).get("declared_in"))
    return config


def environment() -> dict[str, Any]:
  """jaxlab and JAX versions, and the backend and device the computation runs on."""
  device = jax.devices()[0]
  return {"jaxlab": jaxlab.__version__, "jax": jax.__version__, "backend": jax.default_backend(),
          "device": getattr(device, "device_kind", str(device)), "device_count": jax.device_count()}


def _digest(obj: Any) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def checkpoint_meta(config: TrainConfig, model: PlanModel) -> dict[str, Any]:
  """What a checkpoint of this run says about itself (its position is added when it is saved):
  the experiment, the configuration that decides what is computed, and the layer plan, each
  with a hash, and the versions that wrote it."""
  settings = {k: v for k, v in config.to_json().items() if k not in RESUMABLE_CHANGES}
  architecture = describe(model)
  return {"experiment": config.experiment, "config": settings, "config_hash": _digest(settings),
          "architecture": architecture, "architecture_hash": _digest(architecture),
          "jaxlab": jaxlab.__version__, "jax": jax.__version__}


RESTART_HINT = "pass --restart to discard this run's checkpoints and train from scratch"


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


def check_checkpoint_meta(meta: dict[str, Any], expected: dict[str, Any],
                          path: pathlib.Path) -> None:
  """Refuses a checkpoint of another experiment, configuration or architecture, naming both."""
  if "experiment" not in meta:  # A first-format checkpoint says nothing about itself.
    return
  if meta["experiment"] != expected["experiment"]:
    raise checkpoint.CheckpointError(
        f"checkpoint {path} belongs to experiment {meta['experiment']!r} (config "
        f"{meta.get('config_hash')}), not to this run's {expected['experiment']!r} (config "
        f"{expected['config_hash']}); {RESTART_HINT}")
  if meta.get("config_hash") != expected["config_hash"]:
    changed = changed_settings(meta.get("config", {}), expected["config"])
    raise checkpoint.CheckpointError(
        f"checkpoint {path} was written with another configuration of {meta['experiment']!r} "
        f"(config {meta.get('config_hash')} -> {expected['config_hash']}: {', '.join(changed)}); "
        f"{RESTART_HINT}")
  if meta.get("architecture_hash") != expected["architecture_hash"]:
    raise checkpoint.CheckpointError(
        f"checkpoint {path} was written for another architecture of {meta['experiment']!r} "
        f"(its declaration changed since: "
        f"{_architecture_change(meta.get('architecture', {}), expected['architecture'])}); "
        f"{RESTART_HINT}")


def step_of(path: pathlib.Path) -> int:
  """The train step a step checkpoint's name gives (0 for a first-format last.msgpack)."""
  match = _STEP_FILE.fullmatch(path.name)
  return int(match.group(1)) if match else 0


def restore_latest(run: RunDir, template: Any, expected: dict[str, Any],
                   max_step: int | None = None) -> tuple[Any, dict, pathlib.Path] | None:
  """(restored target, meta, path) of the newest intact checkpoint (at `max_step` or before,
  if given), or None if there is none.

  A damaged checkpoint (truncated, bit-flipped) is reported and the one before it is used; one
  of another experiment, configuration or architecture is refused."""
  damaged = []
  for path in run.step_checkpoints():
    if max_step is not None and step_of(path) > max_step:
      continue
    try:
      meta, state_dict = checkpoint.read(path)
    except checkpoint.CorruptCheckpoint as e:
      logging.warning("%s; trying the checkpoint before it", e)
      damaged.append(str(e))
      continue
    check_checkpoint_meta(meta, expected, path)
    if damaged:
      logging.warning("Resuming from %s, the newest intact checkpoint", path)
    return checkpoint.restore_state_dict(state_dict, template, f"checkpoint {path}"), meta, path
  if damaged:
    raise checkpoint.CheckpointError(f"no intact checkpoint in {run.checkpoints}: "
                                     f"{'; '.join(damaged)}; {RESTART_HINT}")
  return None


def check_resume(run: RunDir, config: TrainConfig) -> None:
  """Refuses to resume a run whose saved configuration computes something else than `config`."""
  changed = changed_settings(run.read_config().to_json(), config.to_json())
  if changed:
    raise ValueError(f"{run.root} holds a run with a different configuration "
                     f"({', '.join(changed)}); use another --workdir, or the same settings to "
                     "resume it")


def write_config(run: RunDir, config: TrainConfig, model: PlanModel,
                 data: dict[str, Any], mesh: dict[str, Any] | None = None) -> None:
  """config.json: the resolved settings, where the experiment comes from, the layer plan, the
  data and the environment (with the mesh of devices and processes that trained it)."""
  metrics.write_json(run.config, {"config": config.to_json(),
                                  "experiment": describe_experiment(config.experiment),
                                  "model": describe(model), "data": data,
                                  "environment": {**environment(),
                                                  **({"mesh": mesh} if mesh else {})}})


def summary_dict(run: RunDir, config: TrainConfig, history: list[dict[str, Any]],
                 counts: dict[str, int], status: str,
                 evaluations: dict[str, Any] | None = None,
                 last: pathlib.Path | None = None,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
  """metrics.json's contents from the epochs' records: final and best accuracy, timings,
  checkpoints (`last`: the newest checkpoint, if it may still be being written), and `extra`
  fields."""
  last = last or run.last
  final = history[-1] if history else {}
  best_record = max(history, key=lambda r: r["val_accuracy"]) if history else {}
  out = {
      "experiment": config.experiment, "dataset": config.dataset, "status": status,
      "epochs_completed": len(history), "epochs": config.epochs,
      "final_val_accuracy": final.get("val_accuracy"), "final_val_loss": final.get("val_loss"),
      "best_val_accuracy": best_record.get("val_accuracy"),
      "best_epoch": best_record.get("epoch"),
      **{k: counts[k] for k in ("total_params", "trainable_params", "non_trainable_params")},
      "total_seconds": sum(r["epoch_seconds"] + r["eval_seconds"] for r in history),
      "median_epoch_seconds": (statistics.median(r["epoch_seconds"] for r in history)
                               if history else None),
      "checkpoints": {"last": str(last.relative_to(run.root)),
                      "best": str(run.best.relative_to(run.root))},
  }
  out.update(extra or {})
  if evaluations:
    out["evaluation"] = evaluations
  return out


def write_summary(run: RunDir, *args: Any, **kwargs: Any) -> dict[str, Any]:
  """Writes metrics.json (`summary_dict`'s arguments) and returns what it wrote."""
  out = summary_dict(run, *args, **kwargs)
  metrics.write_json(run.metrics_json, out)
  return out


def load_run(workdir: str | pathlib.Path, which: str = "best") -> tuple[TrainConfig, PlanModel, Any, int]:
  """(config, model, train state, epoch) of a run directory's `which` checkpoint."""
  run = RunDir(workdir)
  config = run.read_config()
  model = build_model(config.experiment, config.dataset, config.precision)
  template = checkpoint_template(create_train_state(
      model, make_optimizer(config.optimizer), config.seed, config.learning_rate))
  expected = checkpoint_meta(config, model)
  if which == "last":
    found = restore_latest(run, template, expected)
    if found is None:
      raise checkpoint.CheckpointError(f"no checkpoint in {run.checkpoints}")
    restored, meta, _ = found
  else:
    path = run.checkpoint(which)
    meta, state_dict = checkpoint.read(path)
    check_checkpoint_meta(meta, expected, path)
    restored = checkpoint.restore_state_dict(state_dict, template, f"checkpoint {path}")
  return config, model, restored["state"], int(meta.get("epoch", 0))


def checkpoint_template(state: Any) -> dict[str, Any]:
  """The structure a checkpoint holds: the train state, and the metric sums of the steps of an
  unfinished epoch (all zero at an epoch's end). The position is the state's step number."""
  return {"state": state, "sums": train_sums_zeros()}


def write_imported_run(workdir: str | pathlib.Path, config: TrainConfig, variables: dict[str, Any],
                       source: str) -> RunDir:
  """A run directory whose checkpoints (epoch 0) hold imported weights and a fresh optimizer.

  Every script that reads run directories works on it; `scripts/train.py` with the same settings
  trains on from the imported weights.
  """
  run = RunDir(workdir)
  if run.config.exists():
    raise FileExistsError(f"{run.root} already holds a run; import into a new --workdir")
  model = build_model(config.experiment, config.dataset, config.precision)
  state = create_train_state(model, make_optimizer(config.optimizer), config.seed,
                             config.learning_rate)
  template = checkpoint_template(state)
  imported = checkpoint_template(state.replace(params=variables["params"],
                                               batch_stats=variables["batch_stats"]))
  checkpoint.check_fits(serialization.to_state_dict(imported),
                        serialization.to_state_dict(template), f"weights from {source}")
  meta = {**checkpoint_meta(config, model), "step": 0, "epoch": 0}
  checkpoint.save(run.step_checkpoint(0), imported, meta)
  checkpoint.save(run.best, imported, meta)
  summary = summarize(model)
  metrics.write_json(run.config, {"config": config.to_json(), "model": describe(model),
                                  "imported_from": str(source)})
  metrics.write_jsonl(run.metrics_jsonl, [])
  metrics.write_json(run.metrics_json, {
      "experiment": config.experiment, "dataset": config.dataset, "status": "imported",
      "imported_from": str(source), "epochs_completed": 0,
      **{k: summary[k] for k in ("total_params", "trainable_params", "non_trainable_params")},
      "checkpoints": {"last": str(run.step_checkpoint(0).relative_to(run.root)),
                      "best": str(run.best.relative_to(run.root))}})
  return run
