"""Lab 04, VGG: on Fashion-MNIST and on CIFAR-10 (32 x 32 x 3), 10 epochs at batch 128.

Sections refer to seeds/001; each follows the report's Keras code. `--dataset` refits any of
them to another data set's image shape.
"""

from __future__ import annotations

from experiments.lab04_common import cnn
from jaxlab.models import Conv, ConvBlock, Dense, MaxPool
from jaxlab.report.findings import Compare, Question


def vgg_blocks(batch_norm=True, dropouts=(0.0,) * 5):
  stages = ((64, 2, 2), (128, 2, 2), (256, 3, 2), (512, 3, 1), (512, 3, 1))
  return [ConvBlock(tuple(Conv(f, 3, padding="same") for _ in range(n)), MaxPool(2, stride),
                    batch_norm, dropout)
          for (f, n, stride), dropout in zip(stages, dropouts)]


def vgg_head(dropout=0.5):
  return [Dense(4096, "relu", batch_norm=False, dropout=dropout)] * 2


SHRINKING = (0.1, 0.2, 0.3, 0.4, 0.5)

cnn("vgg_fashion_mnist", "fashion_mnist", vgg_blocks(), vgg_head(), "VGG on Fashion MNIST",
    "0.9141")
cnn("vgg_cifar10", "cifar10", vgg_blocks(), vgg_head(), "Default VGG Net vs CIFAR Dataset",
    "0.8060")
cnn("vgg_cifar10_dropout04", "cifar10", vgg_blocks(), vgg_head(0.4),
    "VGG Net: Adjusted BatchNorm and Dropout", "0.7900 / 0.8062")
cnn("vgg_cifar10_many_dropouts", "cifar10", vgg_blocks(dropouts=(0.5,) * 5), vgg_head(),
    "VGG Net: Many Dropouts", "0.6982 / 0.7500")
cnn("vgg_cifar10_shrinking_dropouts", "cifar10", vgg_blocks(dropouts=SHRINKING), vgg_head(),
    "VGG Net: Shrinking Dropouts", "0.8176")
cnn("vgg_cifar10_dropouts_no_bn", "cifar10", vgg_blocks(batch_norm=False, dropouts=SHRINKING),
    vgg_head(), "VGG Net: With dropouts but no Batch Norms", "0.1")
cnn("vgg_cifar10_deep_head", "cifar10", vgg_blocks(dropouts=SHRINKING),
    [Dense(4096, "relu", dropout=0.5), Dense(1024, "relu", dropout=0.5),
     Dense(4096, "relu", dropout=0.5)], "VGG Net: Deeper Flattened Part", "not given")

# The seed report's questions, answered by the report from the runs (jaxlab.report.findings).
QUESTIONS = [
    Question("Dropout variants", "Which Dropout scheme suits VGG on CIFAR-10?",
             "Shrinking Dropouts (0.1 to 0.5) were best, 0.8176; 0.5 everywhere hurt (0.6982); "
             "a 0.4 head changed little (0.79).",
             (Compare("vgg_cifar10_dropout04", "vgg_cifar10", "head Dropout 0.4, not 0.5"),
              Compare("vgg_cifar10_many_dropouts", "vgg_cifar10", "Dropout 0.5 after every block"),
              Compare("vgg_cifar10_shrinking_dropouts", "vgg_cifar10",
                      "Dropout 0.1 to 0.5 after the blocks"))),
    Question("BatchNorm", "Can VGG with Dropouts train without BatchNorm?",
             "No: stuck at 10% (chance) without BatchNorm.",
             (Compare("vgg_cifar10_dropouts_no_bn", "vgg_cifar10_shrinking_dropouts",
                      "no BatchNorm"),),
             stability=("vgg_cifar10_dropouts_no_bn",)),
    Question("Head depth", "Does a deeper dense head help?",
             "Not measured in the seed report.",
             (Compare("vgg_cifar10_deep_head", "vgg_cifar10_shrinking_dropouts",
                      "dense head 4096-1024-4096"),)),
]
