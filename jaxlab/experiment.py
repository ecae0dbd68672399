"""Experiments and labs: named architectures with their data and defaults, and their modules.

An experiment is a named architecture with its data set and training defaults; a lab is a
module that declares experiments.

A lab is a Python module whose top-level code calls `register(Experiment(...))` once per
experiment: the built-in ones are `experiments/lab02.py`, `experiments/lab04_alexnet.py` and
`experiments/lab04_vgg.py`; a user's own file with the same calls is a lab too
(`load_lab("path/to/my_lab.py")`). This module never imports `experiments` statically: it loads
a lab's module by name (as big_vision looks models up by module name), so declarations only
look down at the library.

An experiment's model is any Flax module that meets the contract of `jaxlab.models`; its
optimizer a name or a function of its own (`jaxlab.optim`); its metrics, besides loss and
accuracy, its own (`jaxlab.metrics`); its data set a name of `jaxlab.data`'s registry, which a
lab file may add to (`jaxlab.data.register_dataset`).

`resolve_config(name, **overrides)` is an experiment's settings with a user's overrides;
`build_model(name, dataset, precision)` its model, fitted to a data set (what a run's state and
steps are made from: `jaxlab.training.state.setup`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import pathlib
import sys
import traceback
from typing import Any, Callable, Mapping

import flax.linen as nn

from jaxlab import metrics as metrics_lib
from jaxlab import models
from jaxlab.config import TrainConfig, validate
from jaxlab.data import DATASETS, DatasetInfo
from jaxlab.errors import BadValue, LabFileError, MissingFile, UnknownNameError, UserError, one_line
from jaxlab.optim import register_optimizer
from jaxlab.registry import Registry


@dataclasses.dataclass(frozen=True)
class Experiment:
  """One experiment: what to build, on which data, and how to train it (and, for the seed
  architectures, how the report trained it).

  `model`: any Flax module of `jaxlab.models`'s contract. `optimizer`: a name of
  `jaxlab.optim.OPTIMIZERS`, or a function `fn(learning_rate) -> optax.GradientTransformation`
  (registered under its name). `metrics`: the experiment's own, `{name: fn(logits, labels)}`,
  recorded beside loss and accuracy (`jaxlab.metrics`)."""

  name: str
  model: nn.Module
  dataset: str
  epochs: int
  batch_size: int = 128
  optimizer: str | Callable[[float], Any] = "adam"
  learning_rate: float = 1e-3
  metrics: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  report: str = ""  # Which report and section it comes from.
  seed_accuracy: str = ""  # The validation accuracy the report gives (final / best).

  def __post_init__(self):
    if not isinstance(self.model, nn.Module):
      raise BadValue(f"experiment {self.name!r}: model must be a flax.linen.Module (an NNX "
                     f"module through flax.nnx.bridge.to_linen), got {type(self.model).__name__}")
    metrics_lib.table(self.metrics)  # Checked where it is declared.

  @property
  def optimizer_name(self) -> str:
    return self.optimizer if isinstance(self.optimizer, str) else self.optimizer.__name__

  def metric_table(self) -> metrics_lib.Table:
    return metrics_lib.table(self.metrics)

  __hash__ = object.__hash__  # Its metrics are a dict: one experiment, one object.


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
  if not isinstance(experiment.optimizer, str):
    register_optimizer(experiment.optimizer)
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
    # The file's own fault (its syntax, an import it makes, its code, a value jaxlab refused),
    # not a bug of jaxlab's that its code happened to call: that one keeps its traceback.
    if not (isinstance(e, UserError) or _raised_in(e, path)
            or (isinstance(e, SyntaxError) and _same_file(e.filename, path))
            or (isinstance(e, ImportError) and _raised_in(e, path, importing=True))):
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


def _same_file(name: str | None, path: pathlib.Path) -> bool:
  return bool(name) and pathlib.Path(name).resolve() == path


def _raised_in(error: Exception, path: pathlib.Path, importing: bool = False) -> bool:
  """Whether `error` was raised by the code of file `path` itself: its innermost frame is in
  the file (or, `importing`, every frame after the file's last is Python's import machinery:
  an import the file makes failed, not code the import ran)."""
  frames = traceback.extract_tb(error.__traceback__)
  mine = [i for i, frame in enumerate(frames) if _same_file(frame.filename, path)]
  if not mine:
    return False
  after = frames[mine[-1] + 1:]
  return not after or (importing and all(f.filename.startswith("<frozen importlib")
                                         for f in after))


def _failing_line(error: Exception, path: pathlib.Path) -> int | str:
  """The line of the lab file where `error` arose: a syntax error's own, or the innermost frame
  of the traceback that is in the file."""
  if isinstance(error, SyntaxError) and error.lineno is not None:
    return error.lineno
  lines = [frame.lineno for frame in traceback.extract_tb(error.__traceback__)
           if pathlib.Path(frame.filename).resolve() == path]
  return lines[-1] if lines else "?"


# The project's folder: a lab file inside it is recorded relative to it, so that runs (and the
# results committed under docs/) name no machine's path and are read back from any checkout.
PROJECT = pathlib.Path(__file__).resolve().parent.parent


def portable_path(path: str) -> str:
  """A lab file's path as runs record it: relative to the project where it lies inside it
  (`experiments/lab02.py`), absolute elsewhere."""
  if not path:
    return path
  resolved = pathlib.Path(path).resolve()
  return (resolved.relative_to(PROJECT).as_posix() if resolved.is_relative_to(PROJECT)
          else str(resolved))


def recorded_path(path: str) -> pathlib.Path:
  """A lab file `portable_path` recorded: a relative one is the project's."""
  return PROJECT / path if not pathlib.Path(path).is_absolute() else pathlib.Path(path)


def describe_experiment(name: str) -> dict[str, str]:
  """Where experiment `name` comes from, for config.json: its lab, the module and the file that
  declared it (so that any script can read back a run of a user's lab; `portable_path`), and
  the report's own figure."""
  exp = get_experiment(name)
  module, path = _DECLARED_IN.get(name, ("", ""))
  lab = next((lab for lab, m in BUILTIN_LABS.items() if m == module),
             pathlib.Path(path).stem if path else "")
  return {"name": name, "lab": lab, "module": module if module in BUILTIN_LABS.values() else "",
          "declared_in": portable_path(path), "report": exp.report,
          "seed_accuracy": exp.seed_accuracy, "seed_dataset": exp.dataset}


def get_experiment(name: str, declared_in: str | None = None) -> Experiment:
  """The experiment called `name`; an unknown name raises an error listing the known ones.

  `declared_in`, a lab file as a run records it (`portable_path`), is loaded first if `name`
  is not a built-in experiment."""
  _load_builtin_labs()
  if name not in EXPERIMENTS and declared_in:
    if not recorded_path(declared_in).is_file():
      raise MissingFile(f"experiment {name!r} was declared in {declared_in}, which no "
                        "longer exists")
    load_lab(str(recorded_path(declared_in)))
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
                batch_size=exp.batch_size, optimizer=exp.optimizer_name,
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
                precision: str = "float32") -> nn.Module:
  """The experiment's model, fitted to the data set's images and classes (the model's own
  business: `jaxlab.models.fit`), in `precision`, and checked to give one logit per class."""
  exp = get_experiment(experiment) if isinstance(experiment, str) else experiment
  info = DATASETS.get(dataset or exp.dataset) if not isinstance(dataset, DatasetInfo) else dataset
  model = models.fit(exp.model, info.image_shape, info.num_classes)
  models.check_outputs(model, info.image_shape, info.num_classes, exp.name)
  return models.at_precision(model, precision)
