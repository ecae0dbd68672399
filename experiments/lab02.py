"""Lab 02: fourteen MLPs on MNIST (784 inputs, 10 classes), 20 epochs at batch 128.

"D(n)" in the report is Dense(n, relu) followed by BatchNormalization: `D(n)` below.
Sections refer to seeds/000 ("Different Models Architectures").
"""

from __future__ import annotations

import random

from jaxlab.experiment import Experiment, register
from jaxlab.models import MLP, Dense, Parallel
from jaxlab.report.findings import Compare, Question

DROPOUT = 0.15  # The Dropout right before the output layer, where the report shows one.
RANDOM_SIZES = (512, 28, 64, 32, 16)
RANDOM_SIZES_SEED = 0  # The report drew sizes with `random.choice`; a seed names one draw.


def D(n: int, dropout: float = 0.0, batch_norm: bool = True) -> Dense:
  return Dense(n, activation="relu", batch_norm=batch_norm, dropout=dropout)


def random_sizes(seed: int = RANDOM_SIZES_SEED, layers: int = 50) -> list[int]:
  """The 50 hidden sizes of `mlp_random_sizes`, drawn as the report did, from a seeded generator."""
  rng = random.Random(seed)
  return [rng.choice(RANDOM_SIZES) for _ in range(layers)]


def with_final_dropout(sizes: list[int], rate: float = DROPOUT) -> tuple[Dense, ...]:
  return tuple(D(n) for n in sizes[:-1]) + (D(sizes[-1], dropout=rate),)


def _mlp(name: str, layers, section: str, accuracy: str, batch_size: int = 128) -> Experiment:
  return register(Experiment(
      name=name, model=MLP(layers=tuple(layers)), dataset="mnist", epochs=20,
      batch_size=batch_size, report=f"Lab 02, section {section}", seed_accuracy=accuracy))


_mlp("mlp_baseline", with_final_dropout([128] * 3), "1", "0.976")
_mlp("mlp_deep", with_final_dropout([128] * 23), "2", "0.968")
_mlp("mlp_wide_shallow", with_final_dropout([1024] * 5), "3", "0.968", batch_size=512)
_mlp("mlp_halving", with_final_dropout([512, 256, 128, 64, 32]), "4", "0.979")
_mlp("mlp_random_sizes", with_final_dropout([64] + random_sizes() + [64]), "5", "0.20")
_mlp("mlp_big_small_big",
     [D(n) for n in (64, 512, 256, 128, 64, 32, 32, 64, 128, 256, 512)], "6", "0.9767")
_mlp("mlp_big_small_big_big",
     with_final_dropout([512, 256, 128, 64, 32] + [512] * 5 + [64]), "7", "0.9769")
_mlp("mlp_small_big_small",
     with_final_dropout([32, 64, 128, 256, 512] + [256, 128, 64, 32] * 2 + [32]), "8", "0.9729")
_mlp("mlp_parallel_paths",
     [Parallel(paths=((D(64), D(128)), (D(32), D(64)))), D(256)], "9", "0.9767")
_mlp("mlp_diamond", with_final_dropout([32, 64, 128, 128, 128, 64, 32]), "10", "0.9713")
_mlp("mlp_wide_narrow", [D(64)] + [D(256), D(32)] * 5, "11", "not given")
_mlp("mlp_back_n_forth",
     [D(32, batch_norm=False), D(64), D(32, batch_norm=False), D(128), D(16, batch_norm=False),
      D(512), D(256)], "12", "0.97")
_mlp("mlp_thick_thin", [D(64)] + ([D(512)] * 5 + [D(64)] * 3) * 5, "13", "0.68")
_mlp("mlp_dropout", [D(n, dropout=0.5) for n in (512, 256, 128, 64)], "14", "0.9811")

# The seed report's questions, answered by the report from the runs (jaxlab.report.findings).
QUESTIONS = [
    Question("Depth", "Do 20 more layers help?",
             "No: 0.968 against the baseline's 0.976, and slow to converge (section 2).",
             (Compare("mlp_deep", "mlp_baseline", "23 hidden layers of 128, not 3"),)),
    Question("Width", "Do wider layers help?",
             "No: five layers of 1024 reached 0.968 against 0.976 (section 3).",
             (Compare("mlp_wide_shallow", "mlp_baseline",
                      "5 layers of 1024 at batch 512, not 3 of 128"),)),
    Question("Shape of the layer sizes", "Do narrowing, widening or mixed sizes beat equal ones?",
             "Narrowing sizes were best (halving 0.979, big-small-big 0.9767); most shapes land "
             "within a point of the baseline (sections 4, 6-12).",
             (Compare("mlp_halving", "mlp_baseline", "halving sizes 512 to 32"),
              Compare("mlp_big_small_big", "mlp_baseline", "sizes 64, 512 down to 32, back up"),
              Compare("mlp_big_small_big_big", "mlp_baseline", "halving, then five of 512"),
              Compare("mlp_small_big_small", "mlp_baseline", "sizes 32 up to 512 and down"),
              Compare("mlp_diamond", "mlp_baseline", "32 up to 128 and down to 32"),
              Compare("mlp_wide_narrow", "mlp_baseline", "256 and 32 alternating"),
              Compare("mlp_parallel_paths", "mlp_baseline", "two parallel paths, concatenated"))),
    Question("BatchNorm", "Does leaving BatchNorm out of some layers hurt?",
             "Mid/good: 0.97, a point below the baseline (section 12; sizes change too).",
             (Compare("mlp_back_n_forth", "mlp_baseline",
                      "3 of 7 layers without BatchNorm, sizes alternating"),)),
    Question("Dropout", "Does Dropout after every layer help?",
             "Yes, strongly: 0.9811, one of the best (section 14).",
             (Compare("mlp_dropout", "mlp_halving",
                      "Dropout 0.5 after each of 512-256-128-64, not 0.15 before the output"),
              Compare("mlp_dropout", "mlp_baseline", "4 layers with Dropout 0.5"))),
    Question("Instability", "Which architectures fail, and is their training stable?",
             "50 layers of random sizes reached 0.20; thick-thin 0.68, with accuracy swinging "
             "from epoch to epoch (sections 5 and 13).",
             stability=("mlp_random_sizes", "mlp_thick_thin", "mlp_deep")),
]
