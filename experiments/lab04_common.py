"""Lab 04's declarations share one form: a ConvNet trained 10 epochs at batch 128 with Adam.

Each declaration follows the report's Keras code (seeds/001): a conv block is the block's
Conv2D layers, then MaxPooling2D, then BatchNormalization and Dropout where the code has them.
"""

from __future__ import annotations

from jaxlab.experiment import Experiment, register
from jaxlab.models import ConvNet


def cnn(name: str, dataset: str, blocks, head, section: str, accuracy: str) -> Experiment:
  return register(Experiment(
      name=name, model=ConvNet(blocks=tuple(blocks), head=tuple(head)), dataset=dataset,
      epochs=10, batch_size=128, report=f"Lab 04, {section}", seed_accuracy=accuracy))
