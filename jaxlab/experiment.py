"""Experiments: a named architecture with its data set and training defaults."""

from __future__ import annotations

import dataclasses
import importlib

from jaxlab.models import PlanModel
from jaxlab.registry import Registry


@dataclasses.dataclass(frozen=True)
class Experiment:
  """One catalog experiment: what to build, on which data, and how the report trained it."""

  name: str
  model: PlanModel
  dataset: str
  epochs: int
  batch_size: int = 128
  optimizer: str = "adam"
  learning_rate: float = 1e-3
  report: str = ""  # Which report and section it comes from.
  seed_accuracy: str = ""  # The validation accuracy the report gives (final / best).


EXPERIMENTS: Registry[Experiment] = Registry("experiment")


def register(experiment: Experiment) -> Experiment:
  return EXPERIMENTS.register(experiment.name, experiment)


def _load_declarations() -> None:
  # The declarations live in the top-level `experiments` package, one module per lab;
  # importing it registers them.
  importlib.import_module("experiments")


def get_experiment(name: str) -> Experiment:
  """The experiment called `name`; an unknown name raises an error listing the known ones."""
  _load_declarations()
  return EXPERIMENTS.get(name)


def experiment_names() -> list[str]:
  _load_declarations()
  return EXPERIMENTS.names()
