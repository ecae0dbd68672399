"""The resolved configuration of a run: an experiment's defaults with the user's overrides."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax.numpy as jnp

from jaxlab.data import DATASETS, DatasetInfo
from jaxlab.experiment import Experiment, get_experiment
from jaxlab.models import MLP, ConvNet, PlanModel
from jaxlab.optim import OPTIMIZERS

PRECISIONS = {"float32": jnp.float32, "bf16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything that decides what a run computes. Saved as config.json in the run directory."""

  experiment: str
  dataset: str
  epochs: int
  batch_size: int
  optimizer: str
  learning_rate: float
  seed: int = 0
  train_limit: int | None = None  # Use only the first N training examples.
  precision: str = "float32"  # Compute dtype; parameters, optimizer state and loss stay float32.
  eval_batch_size: int = 1000
  steps_per_dispatch: int = 50  # Train steps run by one compiled call (a `lax.scan`).
  data_dir: str | None = None
  download: bool = False

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


# Fields that may differ when a run is resumed: more epochs extend it, the rest say where data is.
RESUMABLE_CHANGES = ("epochs", "data_dir", "download")


def resolve_config(experiment: str, **overrides: Any) -> TrainConfig:
  """The experiment's defaults, with every override that is not None applied and checked."""
  exp = get_experiment(experiment)
  values = dict(experiment=exp.name, dataset=exp.dataset, epochs=exp.epochs,
                batch_size=exp.batch_size, optimizer=exp.optimizer,
                learning_rate=exp.learning_rate)
  fields = {f.name for f in dataclasses.fields(TrainConfig)}
  for key, value in overrides.items():
    if key not in fields:
      raise ValueError(f"unknown setting {key!r}; known: {', '.join(sorted(fields))}")
    if value is not None:
      values[key] = value
  config = TrainConfig(**values)
  validate(config)
  return config


def validate(config: TrainConfig) -> None:
  DATASETS.get(config.dataset)
  OPTIMIZERS.get(config.optimizer)
  for name in ("epochs", "batch_size", "eval_batch_size", "steps_per_dispatch"):
    value = getattr(config, name)
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be a positive integer, got {value!r}")
  if config.train_limit is not None and config.train_limit < 1:
    raise ValueError(f"train_limit must be a positive integer, got {config.train_limit!r}")
  if not (config.learning_rate > 0 and math.isfinite(config.learning_rate)):
    raise ValueError(f"learning_rate must be a positive number, got {config.learning_rate!r}")
  if config.precision not in PRECISIONS:
    raise ValueError(f"unknown precision {config.precision!r}; known: {', '.join(PRECISIONS)}")


def build_model(experiment: Experiment | str, dataset: DatasetInfo | str | None = None,
                precision: str = "float32") -> PlanModel:
  """The experiment's model, fitted to the data set's input shape and classes, in `precision`."""
  exp = get_experiment(experiment) if isinstance(experiment, str) else experiment
  info = DATASETS.get(dataset or exp.dataset) if not isinstance(dataset, DatasetInfo) else dataset
  if precision not in PRECISIONS:
    raise ValueError(f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")
  return _fitted_model(exp, info, precision)


@functools.lru_cache(maxsize=128)
def _fitted_model(exp: Experiment, info: DatasetInfo, precision: str) -> PlanModel:
  # One object per (experiment, data set, precision): the train state holds `model.apply`,
  # and bound methods compare by identity, so the same object keeps jit's caches warm.
  model = exp.model
  changes: dict[str, Any] = {"num_classes": info.num_classes, "dtype": PRECISIONS[precision]}
  if isinstance(model, MLP):
    changes["num_inputs"] = math.prod(info.image_shape)
  elif isinstance(model, ConvNet):
    changes["image_shape"] = info.image_shape
  return model.clone(**changes)
