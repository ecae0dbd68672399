"""Experiments and labs: named architectures with their data and defaults, and their modules.

An experiment is a named architecture with its data set and training defaults; a lab is a
module that declares experiments.

A lab is a Python module whose top-level code calls `register(Experiment(...))` once per
experiment: the built-in ones are `experiments/lab02.py`, `experiments/lab04_alexnet.py` and
`experiments/lab04_vgg.py`; a user's own file with the same calls is a lab too
(`load_lab("path/to/my_lab.py")`). This module never imports `experiments` statically: it loads
a lab's module by name (as big_vision looks models up by module name), so declarations only
look down at the library.

`resolve_config(name, **overrides)` is an experiment's settings with a user's overrides;
`build_model(name, dataset, precision)` its model, fitted to a data set.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import importlib.util
import math
import pathlib
import sys
import traceback
from typing import Any

from jaxlab.config import PRECISIONS, TrainConfig, validate
from jaxlab.data import DATASETS, DatasetInfo
from jaxlab.errors import (BadValue, LabFileError, MissingFile, UnknownNameError, UserError,
                           one_line)
from jaxlab.models import MLP, ConvNet, PlanModel, at_precision
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


@dataclasses.dataclass(frozen=True)
class Lab:
  """A module of experiment declarations, and the experiments it declared, in its order."""

  name: str
  module: str  # The module's name in sys.modules.
  path: str  # Its file.
  experiments: tuple[str, ...]
  # The seed report's questions (jaxlab.report.findings.Question), from the module's QUESTIONS.
  questions: tuple = ()


EXPERIMENTS: Registry[Experiment] = Registry("experiment")
BUILTIN_LABS = {"lab02": "experiments.lab02", "lab04_alexnet": "experiments.lab04_alexnet",
                "lab04_vgg": "experiments.lab04_vgg"}
_DECLARED_IN: dict[str, tuple[str, str]] = {}  # experiment name -> (module name, file)
_FILE_LABS: dict[pathlib.Path, Lab] = {}


# The lab whose module is being loaded (its name and file), while it is: what `register`
# attributes an experiment to, however deep the helper that calls it (experiments/
# lab04_common.py makes the calls of both Lab 04 modules).
_LOADING: list[tuple[str, str]] = []


def register(experiment: Experiment) -> Experiment:
  """Adds `experiment` to the catalog, declared by the lab being loaded (`load_lab`; none where
  it is called outside one); a name that is already taken fails naming both places."""
  module, path = _LOADING[-1] if _LOADING else ("", "")
  if experiment.name in EXPERIMENTS:
    _, other = _DECLARED_IN.get(experiment.name, ("", "?"))
    raise BadValue(f"experiment name {experiment.name!r} declared in {path or module} is "
                   f"already taken (declared in {other or '?'}); choose another name")
  _DECLARED_IN[experiment.name] = (module, path)
  return EXPERIMENTS.register(experiment.name, experiment)


def _load_builtin_labs() -> None:
  for module in BUILTIN_LABS.values():
    if module not in sys.modules:
      _LOADING.append((module, importlib.util.find_spec(module).origin))
      try:
        importlib.import_module(module)
      finally:
        _LOADING.pop()


def _lab_of_module(name: str, module: str, path: str) -> Lab:
  names = tuple(n for n, (m, _) in _DECLARED_IN.items() if m == module)
  if not names:
    raise LabFileError(f"lab {path} declares no experiments; a lab calls "
                       "jaxlab.experiment.register(Experiment(...)) at its top level, as "
                       "experiments/lab02.py does")
  return Lab(name, module, path, names, tuple(getattr(sys.modules.get(module), "QUESTIONS", ())))


def load_lab(spec: str) -> Lab:
  """A built-in lab by name (`lab02`, `lab04_alexnet`, `lab04_vgg`), or a user's lab file by
  path (`my_lab.py`), loaded once per process; the built-in labs are loaded first, so a user's
  name that is already taken fails naming both files."""
  _load_builtin_labs()
  if spec in BUILTIN_LABS:
    module = sys.modules[BUILTIN_LABS[spec]]
    return _lab_of_module(spec, module.__name__, module.__file__)
  if not spec.endswith(".py"):
    raise UnknownNameError(f"unknown lab {spec!r}; known labs: {', '.join(BUILTIN_LABS)}, "
                           "or the path of a Python file that declares experiments")
  path = pathlib.Path(spec).resolve()
  if path in _FILE_LABS:
    return _FILE_LABS[path]
  if not path.is_file():
    raise MissingFile(f"lab file {spec} does not exist")
  # A module name of its own per file, so two users' `my_lab.py` never collide in sys.modules.
  module_name = f"jaxlab_labs.{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
  module_spec = importlib.util.spec_from_file_location(module_name, path)
  module = importlib.util.module_from_spec(module_spec)
  sys.modules[module_name] = module
  _LOADING.append((module_name, str(path)))
  try:
    module_spec.loader.exec_module(module)
  except Exception as e:
    del sys.modules[module_name]
    line = _failing_line(e, path)
    # The file's own fault (its syntax, its imports, its code, a value jaxlab refused), not a
    # bug of jaxlab's that its code happened to call: that one keeps its traceback.
    if not (isinstance(e, (SyntaxError, ImportError, UserError)) or _raised_in(e, path)):
      raise
    detail = e.msg if isinstance(e, SyntaxError) else one_line(e)
    raise LabFileError(f"lab file {spec}, line {line}: {type(e).__name__}: {detail}") from e
  except BaseException:
    del sys.modules[module_name]
    raise
  finally:
    _LOADING.pop()
  _FILE_LABS[path] = lab = _lab_of_module(path.stem, module_name, str(path))
  return lab


def _raised_in(error: Exception, path: pathlib.Path) -> bool:
  """Whether `error` was raised by the code of file `path` itself (its innermost frame)."""
  frames = traceback.extract_tb(error.__traceback__)
  return bool(frames) and pathlib.Path(frames[-1].filename).resolve() == path


def _failing_line(error: Exception, path: pathlib.Path) -> int | str:
  """The line of the lab file where `error` arose: a syntax error's own, or the innermost frame
  of the traceback that is in the file."""
  if isinstance(error, SyntaxError) and error.lineno is not None:
    return error.lineno
  lines = [frame.lineno for frame in traceback.extract_tb(error.__traceback__)
           if pathlib.Path(frame.filename).resolve() == path]
  return lines[-1] if lines else "?"


def describe_experiment(name: str) -> dict[str, str]:
  """Where experiment `name` comes from, for config.json: its lab, the file that declared it
  (so that any script can read back a run of a user's lab), and the report's own figure."""
  exp = get_experiment(name)
  module, path = _DECLARED_IN.get(name, ("", ""))
  lab = next((lab for lab, m in BUILTIN_LABS.items() if m == module),
             pathlib.Path(path).stem if path else "")
  return {"name": name, "lab": lab, "declared_in": path, "report": exp.report,
          "seed_accuracy": exp.seed_accuracy, "seed_dataset": exp.dataset}


def get_experiment(name: str, declared_in: str | None = None) -> Experiment:
  """The experiment called `name`; an unknown name raises an error listing the known ones.

  `declared_in`, a lab file, is loaded first if `name` is not a built-in experiment."""
  _load_builtin_labs()
  if name not in EXPERIMENTS and declared_in:
    if not pathlib.Path(declared_in).is_file():
      raise MissingFile(f"experiment {name!r} was declared in {declared_in}, which no "
                        "longer exists")
    load_lab(declared_in)
  return EXPERIMENTS.get(name)


def experiment_names() -> list[str]:
  """The catalog: every experiment of the built-in labs (not those of users' lab files)."""
  _load_builtin_labs()
  builtin = set(BUILTIN_LABS.values())
  return [name for name in EXPERIMENTS.names() if _DECLARED_IN.get(name, ("",))[0] in builtin]


def resolve_config(experiment: str, **overrides: Any) -> TrainConfig:
  """The experiment's defaults, with every override that is not None applied and checked."""
  exp = get_experiment(experiment)
  values = dict(experiment=exp.name, dataset=exp.dataset, epochs=exp.epochs,
                batch_size=exp.batch_size, optimizer=exp.optimizer,
                learning_rate=exp.learning_rate)
  fields = {f.name for f in dataclasses.fields(TrainConfig)}
  for key, value in overrides.items():
    if key not in fields:
      raise BadValue(f"unknown setting {key!r}; known: {', '.join(sorted(fields))}")
    if value is not None:
      values[key] = value
  config = TrainConfig(**values)
  validate(config)
  return config


def build_model(experiment: Experiment | str, dataset: DatasetInfo | str | None = None,
                precision: str = "float32") -> PlanModel:
  """The experiment's model, fitted to the data set's input shape and classes, in `precision`."""
  exp = get_experiment(experiment) if isinstance(experiment, str) else experiment
  info = DATASETS.get(dataset or exp.dataset) if not isinstance(dataset, DatasetInfo) else dataset
  if precision not in PRECISIONS:
    raise BadValue(f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")
  return _fitted_model(exp, info, precision)


@functools.lru_cache(maxsize=128)
def _fitted_model(exp: Experiment, info: DatasetInfo, precision: str) -> PlanModel:
  # One object per (experiment, data set, precision): the train state holds `model.apply`,
  # and bound methods compare by identity, so the same object keeps jit's caches warm.
  model = exp.model
  changes: dict[str, Any] = {"num_classes": info.num_classes}
  if isinstance(model, MLP):
    changes["num_inputs"] = math.prod(info.image_shape)
  elif isinstance(model, ConvNet):
    changes["image_shape"] = info.image_shape
  return at_precision(model.clone(**changes), precision)
