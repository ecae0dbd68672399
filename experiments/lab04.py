"""Lab 04: AlexNet on Fashion-MNIST, VGG on Fashion-MNIST and CIFAR-10; 10 epochs at batch 128.

Each declaration follows the report's Keras code (seeds/001): a conv block is the block's
Conv2D layers, then MaxPooling2D, then BatchNormalization and Dropout where the code has them.
"""

from __future__ import annotations

from jaxlab.experiment import Experiment, register
from jaxlab.models import Conv, ConvBlock, ConvNet, Dense, MaxPool


def _cnn(name: str, dataset: str, blocks, head, section: str, accuracy: str) -> Experiment:
  return register(Experiment(
      name=name, model=ConvNet(blocks=tuple(blocks), head=tuple(head)), dataset=dataset,
      epochs=10, batch_size=128, report=f"Lab 04, {section}", seed_accuracy=accuracy))


# ----------------------------------------------------------------------------- AlexNet


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


_cnn("alexnet", "fashion_mnist", alexnet_blocks(), alexnet_head(),
     "Default AlexNet Model vs Fashion MNIST", "0.8596")
_cnn("alexnet_no_bn", "fashion_mnist", alexnet_blocks(batch_norm=False), alexnet_head(),
     "No Batch Normalization after each Conv Block", "0.8547")
_cnn("alexnet_no_dense_dropout", "fashion_mnist", alexnet_blocks(), alexnet_head(dropout=0.0),
     "No Dropouts in Flattened part of model", "0.8475")
_cnn("alexnet_conv_dropout", "fashion_mnist", alexnet_blocks(dropouts=(0.25, 0.25, 0.25)),
     alexnet_head(), "Added Dropouts after each Conv-Pool Block", "0.8217 / 0.8638")
_cnn("alexnet_l2", "fashion_mnist", alexnet_blocks(dropouts=(0.1, 0.1, 0.4), l2=0.01),
     alexnet_head(activation="relu", l2=0.01), "Regularizers", "0.8075 / 0.8454")
_cnn("alexnet_pool_stride", "fashion_mnist",
     alexnet_blocks(padding="same", pools=((3, 2), (3, 2), (2, 2))), alexnet_head(),
     "Max Pool 2D Modified - Strides and pool size", "0.8734 / 0.8955")


# ----------------------------------------------------------------------------- VGG


def vgg_blocks(batch_norm=True, dropouts=(0.0,) * 5):
  stages = ((64, 2, 2), (128, 2, 2), (256, 3, 2), (512, 3, 1), (512, 3, 1))
  return [ConvBlock(tuple(Conv(f, 3, padding="same") for _ in range(n)), MaxPool(2, stride),
                    batch_norm, dropout)
          for (f, n, stride), dropout in zip(stages, dropouts)]


def vgg_head(dropout=0.5):
  return [Dense(4096, "relu", batch_norm=False, dropout=dropout)] * 2


SHRINKING = (0.1, 0.2, 0.3, 0.4, 0.5)

_cnn("vgg_fashion_mnist", "fashion_mnist", vgg_blocks(), vgg_head(), "VGG on Fashion MNIST",
     "0.9141")
_cnn("vgg_cifar10", "cifar10", vgg_blocks(), vgg_head(), "Default VGG Net vs CIFAR Dataset",
     "0.8060")
_cnn("vgg_cifar10_dropout04", "cifar10", vgg_blocks(), vgg_head(0.4),
     "VGG Net: Adjusted BatchNorm and Dropout", "0.7900 / 0.8062")
_cnn("vgg_cifar10_many_dropouts", "cifar10", vgg_blocks(dropouts=(0.5,) * 5), vgg_head(),
     "VGG Net: Many Dropouts", "0.6982 / 0.7500")
_cnn("vgg_cifar10_shrinking_dropouts", "cifar10", vgg_blocks(dropouts=SHRINKING), vgg_head(),
     "VGG Net: Shrinking Dropouts", "0.8176")
_cnn("vgg_cifar10_dropouts_no_bn", "cifar10", vgg_blocks(batch_norm=False, dropouts=SHRINKING),
     vgg_head(), "VGG Net: With dropouts but no Batch Norms", "0.1")
_cnn("vgg_cifar10_deep_head", "cifar10", vgg_blocks(dropouts=SHRINKING),
     [Dense(4096, "relu", dropout=0.5), Dense(1024, "relu", dropout=0.5),
      Dense(4096, "relu", dropout=0.5)], "VGG Net: Deeper Flattened Part", "not given")
