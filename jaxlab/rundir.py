"""Run directories: their files, the run's bookkeeping (config.json, metrics.json), and
rebuilding a run's model and state from the directory alone."""

from __future__ import annotations

import json
import pathlib
import statistics
from typing import Any

import jax
from flax import serialization

import jaxlab
from jaxlab import checkpoint, metrics
from jaxlab.config import TrainConfig, build_model, changed_settings, validate
from jaxlab.experiment import describe_experiment, get_experiment
from jaxlab.models import PlanModel, describe
from jaxlab.optim import make_optimizer
from jaxlab.state import create_train_state
from jaxlab.summary import summarize

CHECKPOINTS = ("last", "best")


class RunDir:
  """The files of a run directory (see the README's table)."""

  def __init__(self, workdir: str | pathlib.Path):
    self.root = pathlib.Path(workdir)
    self.config = self.root / "config.json"
    self.metrics_jsonl = self.root / "metrics.jsonl"
    self.metrics_json = self.root / "metrics.json"
    self.checkpoints = self.root / "checkpoints"
    self.last = self.checkpoints / "last.msgpack"
    self.best = self.checkpoints / "best.msgpack"
    self.tensorboard = self.root / "tensorboard"

  def checkpoint(self, which: str) -> pathlib.Path:
    if which not in CHECKPOINTS:
      raise ValueError(f"unknown checkpoint {which!r}; known: {', '.join(CHECKPOINTS)}")
    return self.checkpoints / f"{which}.msgpack"

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


def check_resume(run: RunDir, config: TrainConfig) -> None:
  """Refuses to resume a run whose saved configuration computes something else than `config`."""
  changed = changed_settings(run.read_config().to_json(), config.to_json())
  if changed:
    raise ValueError(f"{run.root} holds a run with a different configuration "
                     f"({', '.join(changed)}); use another --workdir, or the same settings to "
                     "resume it")


def write_config(run: RunDir, config: TrainConfig, model: PlanModel,
                 data: dict[str, Any]) -> None:
  """config.json: the resolved settings, where the experiment comes from, the layer plan, the
  data and the environment."""
  metrics.write_json(run.config, {"config": config.to_json(),
                                  "experiment": describe_experiment(config.experiment),
                                  "model": describe(model), "data": data,
                                  "environment": environment()})


def write_summary(run: RunDir, config: TrainConfig, history: list[dict[str, Any]],
                  counts: dict[str, int], status: str,
                  evaluations: dict[str, Any] | None = None) -> dict[str, Any]:
  """metrics.json from the epochs' records: final and best accuracy, timings, checkpoints."""
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
      "checkpoints": {"last": str(run.last.relative_to(run.root)),
                      "best": str(run.best.relative_to(run.root))},
  }
  if evaluations:
    out["evaluation"] = evaluations
  metrics.write_json(run.metrics_json, out)
  return out


def load_run(workdir: str | pathlib.Path, which: str = "best") -> tuple[TrainConfig, PlanModel, Any, int]:
  """(config, model, train state, epoch) of a run directory's `which` checkpoint."""
  run = RunDir(workdir)
  config = run.read_config()
  model = build_model(config.experiment, config.dataset, config.precision)
  template = create_train_state(model, make_optimizer(config.optimizer, config.learning_rate),
                                config.seed)
  restored = checkpoint.restore(run.checkpoint(which), {"epoch": 0, "state": template})
  return config, model, restored["state"], int(restored["epoch"])


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
  state = create_train_state(model, make_optimizer(config.optimizer, config.learning_rate),
                             config.seed)
  imported = {"epoch": 0, "state": state.replace(params=variables["params"],
                                                 batch_stats=variables["batch_stats"])}
  template = {"epoch": 0, "state": state}
  checkpoint.check_fits(serialization.to_state_dict(imported),
                        serialization.to_state_dict(template), f"weights from {source}")
  checkpoint.save(run.last, imported)
  checkpoint.save(run.best, imported)
  summary = summarize(model)
  metrics.write_json(run.config, {"config": config.to_json(), "model": describe(model),
                                  "imported_from": str(source)})
  metrics.write_jsonl(run.metrics_jsonl, [])
  metrics.write_json(run.metrics_json, {
      "experiment": config.experiment, "dataset": config.dataset, "status": "imported",
      "imported_from": str(source), "epochs_completed": 0,
      **{k: summary[k] for k in ("total_params", "trainable_params", "non_trainable_params")},
      "checkpoints": {"last": "checkpoints/last.msgpack", "best": "checkpoints/best.msgpack"}})
  return run
