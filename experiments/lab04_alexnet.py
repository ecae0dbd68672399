"""Lab 04, AlexNet: six variants on Fashion-MNIST (28 x 28 x 1), 10 epochs at batch 128.

Sections refer to seeds/001; each follows the report's Keras code.
"""

from __future__ import annotations

from experiments.lab04_common import cnn
from jaxlab.models import Conv, ConvBlock, Dense, MaxPool
from jaxlab.report.findings import Compare, Question


def alexnet_blocks(batch_norm=True, dropouts=(0.0, 0.0, 0.0), l2=0.0, padding="valid",
                   pools=((3, 1), (3, 1), (3, 1))):
  convs = ((Conv(96, 11, padding=padding, l2=l2),),
           (Conv(256, 5, padding=padding, l2=l2),),
           (Conv(256, 3, padding=padding, l2=l2), Conv(384, 3, padding=padding, l2=l2),
            Conv(384, 3, padding=padding, l2=l2)))
  return [ConvBlock(c, MaxPool(*pool), batch_norm, dropout)
          for c, pool, dropout in zip(convs, pools, dropouts)]


def alexnet_head(dropout=0.5, activation="tanh", l2=0.0):
  return [Dense(4096, activation, batch_norm=False, dropout=dropout, l2=l2)] * 2


cnn("alexnet", "fashion_mnist", alexnet_blocks(), alexnet_head(),
    "Default AlexNet Model vs Fashion MNIST", "0.8596")
cnn("alexnet_no_bn", "fashion_mnist", alexnet_blocks(batch_norm=False), alexnet_head(),
    "No Batch Normalization after each Conv Block", "0.8547")
cnn("alexnet_no_dense_dropout", "fashion_mnist", alexnet_blocks(), alexnet_head(dropout=0.0),
    "No Dropouts in Flattened part of model", "0.8475")
cnn("alexnet_conv_dropout", "fashion_mnist", alexnet_blocks(dropouts=(0.25, 0.25, 0.25)),
    alexnet_head(), "Added Dropouts after each Conv-Pool Block", "0.8217 / 0.8638")
cnn("alexnet_l2", "fashion_mnist", alexnet_blocks(dropouts=(0.1, 0.1, 0.4), l2=0.01),
    alexnet_head(activation="relu", l2=0.01), "Regularizers", "0.8075 / 0.8454")
cnn("alexnet_pool_stride", "fashion_mnist",
    alexnet_blocks(padding="same", pools=((3, 2), (3, 2), (2, 2))), alexnet_head(),
    "Max Pool 2D Modified - Strides and pool size", "0.8734 / 0.8955")

# The seed report's questions, answered by the report from the runs (jaxlab.report.findings).
QUESTIONS = [
    Question("BatchNorm", "Does BatchNorm after each conv block help?",
             "Slightly: 0.8547 without it against 0.8596.",
             (Compare("alexnet_no_bn", "alexnet", "no BatchNorm after the conv blocks"),)),
    Question("Dropout placement", "Where should Dropout go?",
             "Removing the dense Dropout cost a little (0.8475); Dropout after the conv blocks "
             "converged slower, 0.8217 at the end, 0.8638 at its best epoch.",
             (Compare("alexnet_no_dense_dropout", "alexnet", "no Dropout in the dense head"),
              Compare("alexnet_conv_dropout", "alexnet", "Dropout 0.25 after each conv block"))),
    Question("L2", "Does L2 regularization help?",
             "No: 0.8075 (best 0.8454); the regularizers did not have the intended effect.",
             (Compare("alexnet_l2", "alexnet",
                      "L2 0.01 everywhere, ReLU head, conv Dropout 0.1/0.1/0.4"),)),
    Question("Pooling stride", "Do strided pools with 'same' padding help?",
             "Yes: the best AlexNet, 0.8734 (best epoch 0.8955).",
             (Compare("alexnet_pool_stride", "alexnet", "'same' padding, pools of stride 2"),)),
    Question("Instability", "Which variants train unstably?",
             "Dropout after the conv blocks made convergence uneven.",
             stability=("alexnet_conv_dropout", "alexnet_l2")),
]
