"""The settings of a run (`TrainConfig`): checked, saved as JSON, compared on resume.

They decide what a run computes. This module imports nothing of JAX, so a report can read a
run's settings anywhere.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

from jaxlab.data import DATASETS
from jaxlab.errors import BadValue

PRECISIONS = ("float32", "bf16")  # What each computes in: jaxlab.models.at_precision.
NAN_POLICIES = ("stop", "skip")


# What a setting is, as each TrainConfig field declares it (`role`), and what that allows: whether
# a resumed run may change it, and whether it changes what a run computes. Every list of
# settings that jaxlab keeps is derived from this table (below TrainConfig).
ROLES = {
    # role: (may change on resume, changes results)
    "computes": (False, True),  # The experiment, its data, model, optimizer and batch.
    "length": (True, True),  # epochs: more extend a finished run.
    "member": (False, True),  # Seed and learning rate: what the members of a group differ in.
    "where": (True, False),  # Where the data is: a machine's paths.
    "dispatch": (False, False),  # How steps and evaluation are cut into compiled calls.
    "safety": (True, False),  # When checkpoints are written, what a NaN does.
    "devices": (True, False),  # How many devices share the work (a checkpoint restores on any).
}



def check_choice(name: str, value: Any, known: Sequence[str]) -> None:
  """A `BadValue` naming `value` and the `known` choices of setting `name`, unless it is one."""
  if value not in known:
    raise BadValue(f"unknown {name} {value!r}; known: {', '.join(known)}")

def _setting(help_text: str, role: str = "computes", **kwargs: Any) -> Any:
  """A TrainConfig field with its `role` (ROLES); its help text is the help of the flag that
  overrides it (jaxlab.cli)."""
  assert role in ROLES, role
  return dataclasses.field(metadata={"help": help_text, "role": role}, **kwargs)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything that decides what a run computes. Saved as config.json in the run directory.

  Every field but `experiment` is also a command-line flag of the training scripts, generated
  from this class (`jaxlab.cli.define_config_flags`), with the help text given here."""

  experiment: str = _setting("Experiment name: one of the catalog "
                              "(docs/guide/seed-studies.md) or of the --lab file.")
  dataset: str = _setting(f"Data set: {', '.join(DATASETS.names())}, or one a lab file "
                          "registers (jaxlab.data.register_dataset). Default: the experiment's "
                          "own.")
  epochs: int = _setting("Epochs to train; a larger value extends a finished run. Default: "
                         "the experiment's.", role="length")
  batch_size: int = _setting("Training batch size. Default: the experiment's.")
  optimizer: str = _setting("adam, sgd, momentum, nadam or rmsprop (Keras's defaults), or the "
                            "name of an optimizer function a lab file declares "
                            "(jaxlab.optim). Default: the experiment's (adam).")
  learning_rate: float = _setting("Learning rate. Default: the experiment's (1e-3).",
                                  role="member")
  seed: int = _setting("Seed of initialization, shuffling and dropout. Default: 0.",
                       role="member", default=0)
  train_limit: int | None = _setting("Use only the first N training examples. Default: all.",
                                     default=None)
  precision: str = _setting("float32, or bf16: on the CPU, dots on bfloat16 operands, "
                            "accumulated and written in float32 (convolutions float32); on a "
                            "GPU, bfloat16 layers; parameters, optimizer state and loss float32 "
                            "in both (jaxlab.models.at_precision). Default: float32.",
                            default="float32")
  eval_batch_size: int = _setting("Validation batch size. Default: 1000.", role="dispatch",
                                  default=1000)
  steps_per_dispatch: int = _setting("Train steps per compiled call (one lax.scan). Default: "
                                     "50.", role="dispatch", default=50)
  data_dir: str | None = _setting("Directory with the data set's raw files or a TFDS-prepared "
                                  "copy (docs/guide/seed-studies.md).", role="where", default=None)
  download: bool = _setting("Let TFDS download and prepare the data set (needs network and "
                            "TensorFlow).", role="where", default=False)
  checkpoint_every_steps: int = _setting(
      "Also save a checkpoint inside an epoch every N train steps (at the first compiled-call "
      "boundary at or after N steps); 0: only by time. Default: 0.", role="safety", default=0)
  checkpoint_every_secs: float = _setting(
      "Also save a checkpoint inside an epoch when this many seconds have passed since the "
      "last one, so a long epoch is never lost; 0: off. Default: 600.", role="safety",
      default=600.0)
  keep_checkpoints: int = _setting("How many of the newest checkpoints to keep (besides the "
                                   "best). Default: 2.", role="safety", default=2)
  nan_policy: str = _setting("On a NaN or infinite loss or gradient: stop (the run ends with an "
                             "error; its last good checkpoints stay) or skip (that step's "
                             "update is dropped and counted in skipped_steps). Default: stop.",
                             default="stop", role="safety")
  num_devices: int | None = _setting(
      "Data parallelism over the first N devices (each global batch split across them). "
      "Default: all devices of all processes.", role="devices", default=None)

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, settings: dict[str, Any]) -> "TrainConfig":
    """The settings as config.json holds them; a setting added to jaxlab after the run was
    written takes its default. An unknown setting is refused, naming it."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(settings) - fields)
    if unknown:
      raise BadValue(f"unknown setting {unknown[0]!r}; known: {', '.join(sorted(fields))}")
    try:
      return cls(**settings)
    except TypeError as e:  # A required setting is missing.
      raise BadValue(f"settings {settings!r} are incomplete: {e}") from None

  def replace(self, **changes: Any) -> "TrainConfig":
    """A copy with `changes`, checked as every config is (`validate`)."""
    config = dataclasses.replace(self, **changes)
    validate(config)
    return config


def settings(role: str | None = None, *, resumable: bool | None = None,
             results: bool | None = None) -> tuple[str, ...]:
  """The names of TrainConfig's settings of `role`, or those that may (not) change on resume,
  or that do (not) change results (`ROLES`), in the class's order."""
  return tuple(f.name for f in dataclasses.fields(TrainConfig)
               if (role is None or f.metadata["role"] == role)
               and (resumable is None or ROLES[f.metadata["role"]][0] == resumable)
               and (results is None or ROLES[f.metadata["role"]][1] == results))


# Settings that may differ when a run is resumed: more epochs extend it, where the data is,
# when checkpoints are written, what a NaN does (a run stopped by one can go on skipping), and
# how many devices share the work.
RESUMABLE_CHANGES = settings(resumable=True)
# Settings that change no result: runs that differ only in these (and the seed) are one
# experiment's seeds in a report.
NO_RESULT_CHANGE = settings(results=False)
WHERE_SETTINGS = settings("where")  # A machine's paths: they stay out of a report.
GROUP_SETTINGS = settings("member")  # What the members of a group may differ in.


def changed_settings(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
  """"k: old -> new" for each setting that differs and would change what a run computes."""
  keys = [k for k in dict.fromkeys([*old, *new]) if k not in RESUMABLE_CHANGES]
  return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def validate(config: TrainConfig) -> None:
  """Raises BadValue (UnknownNameError for an unknown name) naming the first bad setting."""
  # The optimizers' registry imports optax: only when a config is checked, so that reading a
  # run's settings (the report) needs no JAX.
  from jaxlab.optim import OPTIMIZERS

  DATASETS.get(config.dataset)
  OPTIMIZERS.get(config.optimizer)
  for name in ("epochs", "batch_size", "eval_batch_size", "steps_per_dispatch",
               "keep_checkpoints"):
    value = getattr(config, name)
    if not isinstance(value, int) or value < 1:
      raise BadValue(f"{name} must be a positive integer, got {value!r}")
  if config.num_devices is not None and config.num_devices < 1:
    raise BadValue(f"num_devices must be a positive integer, got {config.num_devices!r}")
  if config.train_limit is not None and config.train_limit < 1:
    raise BadValue(f"train_limit must be a positive integer, got {config.train_limit!r}")
  if not (config.learning_rate > 0 and math.isfinite(config.learning_rate)):
    raise BadValue(f"learning_rate must be a positive number, got {config.learning_rate!r}")
  check_choice("precision", config.precision, PRECISIONS)
  check_choice("nan_policy", config.nan_policy, NAN_POLICIES)
  if not (isinstance(config.checkpoint_every_steps, int) and config.checkpoint_every_steps >= 0):
    raise BadValue(f"checkpoint_every_steps must be 0 or a positive integer, got "
                   f"{config.checkpoint_every_steps!r}")
  if not (config.checkpoint_every_secs >= 0 and math.isfinite(config.checkpoint_every_secs)):
    raise BadValue(f"checkpoint_every_secs must be 0 or a positive number, got "
                   f"{config.checkpoint_every_secs!r}")
