"""Run directories: their files, and rebuilding a run's model and state from them alone."""

from __future__ import annotations

import json
import pathlib
from typing import Any

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
