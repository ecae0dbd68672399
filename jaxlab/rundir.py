"""Run directories: their files, and rebuilding a run's model and state from them alone."""

from __future__ import annotations

import json
import pathlib
from typing import Any

from flax import serialization

from jaxlab import checkpoint
from jaxlab.config import TrainConfig, build_model, validate
from jaxlab.models import PlanModel

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

  def checkpoint(self, which: str) -> pathlib.Path:
    if which not in CHECKPOINTS:
      raise ValueError(f"unknown checkpoint {which!r}; known: {', '.join(CHECKPOINTS)}")
    return self.checkpoints / f"{which}.msgpack"

  def read_config(self) -> TrainConfig:
    """The run's resolved configuration, from config.json."""
    if not self.config.is_file():
      raise FileNotFoundError(f"{self.root} is not a run directory: it has no config.json")
    config = TrainConfig(**json.loads(self.config.read_text())["config"])
    validate(config)
    return config


def load_run(workdir: str | pathlib.Path, which: str = "best") -> tuple[TrainConfig, PlanModel, Any, int]:
  """(config, model, train state, epoch) of a run directory's `which` checkpoint."""
  from jaxlab.optim import make_optimizer
  from jaxlab.train import create_train_state

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
  from jaxlab import metrics
  from jaxlab.models import describe
  from jaxlab.optim import make_optimizer
  from jaxlab.summary import summarize
  from jaxlab.train import create_train_state

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
