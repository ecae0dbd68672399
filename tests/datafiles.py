"""Writers of small data files in the real on-disk formats (IDX, CIFAR-10 python and binary)."""

from __future__ import annotations

import gzip
import io
import pathlib
import pickle
import tarfile

import numpy as np

from jaxlab.data import IDX_NAMES


def idx_bytes(array: np.ndarray) -> bytes:
  magic = 0x0800 << 0 | array.ndim  # 0x08: unsigned byte; last byte: number of dimensions.
  header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
  return header + array.astype(np.uint8).tobytes()


def random_split(rng: np.random.Generator, n: int, shape=(28, 28), classes=10):
  return (rng.integers(0, 256, (n, *shape), dtype=np.uint8),
          rng.integers(0, classes, (n,), dtype=np.uint8))


def write_idx_dataset(directory: pathlib.Path, n_train=64, n_test=32, gz=True, seed=0):
  """Writes the four MNIST-style IDX files; returns the arrays written."""
  rng = np.random.default_rng(seed)
  directory.mkdir(parents=True, exist_ok=True)
  arrays = {}
  for split, n in (("train", n_train), ("test", n_test)):
    arrays[f"{split}_images"], arrays[f"{split}_labels"] = random_split(rng, n)
  for key, stem in IDX_NAMES.items():
    data = idx_bytes(arrays[key])
    if gz:
      (directory / f"{stem}.gz").write_bytes(gzip.compress(data))
    else:
      (directory / stem).write_bytes(data)
  return arrays


def write_idx_arrays(directory: pathlib.Path, dataset) -> pathlib.Path:
  """Writes a (28 x 28 x 1) in-memory Dataset as the four gzipped IDX files."""
  directory.mkdir(parents=True, exist_ok=True)
  arrays = {"train_images": dataset.train_images[..., 0], "train_labels": dataset.train_labels,
            "test_images": dataset.test_images[..., 0], "test_labels": dataset.test_labels}
  for key, stem in IDX_NAMES.items():
    (directory / f"{stem}.gz").write_bytes(gzip.compress(idx_bytes(arrays[key])))
  return directory


def _cifar_arrays(rng, n):
  images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, (n,), dtype=np.uint8)
  return images, labels


def write_cifar10(directory: pathlib.Path, kind: str, per_batch=4, seed=0):
  """Writes a CIFAR-10 tarball (`python` or `binary`) with `per_batch` images per batch file."""
  rng = np.random.default_rng(seed)
  directory.mkdir(parents=True, exist_ok=True)
  names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
  members, train, test = {}, [], []
  for name in names:
    images, labels = _cifar_arrays(rng, per_batch)
    (test if name == "test_batch" else train).append((images, labels))
    planes = images.transpose(0, 3, 1, 2).reshape(per_batch, 3072)  # Row of R, then G, then B.
    if kind == "python":
      members[name] = pickle.dumps({b"data": planes, b"labels": labels.tolist()})
    else:
      records = np.concatenate([labels[:, None], planes], axis=1)
      members[name + ".bin"] = records.astype(np.uint8).tobytes()
  folder = "cifar-10-batches-py" if kind == "python" else "cifar-10-batches-bin"
  path = directory / ("cifar-10-python.tar.gz" if kind == "python" else "cifar-10-binary.tar.gz")
  with tarfile.open(path, "w:gz") as tar:
    for name, data in members.items():
      info = tarfile.TarInfo(f"{folder}/{name}")
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  cat = lambda parts, i: np.concatenate([p[i] for p in parts])
  return {"train_images": cat(train, 0), "train_labels": cat(train, 1),
          "test_images": cat(test, 0), "test_labels": cat(test, 1)}, path


def synthetic_dataset(name="mnist", n_train=256, n_test=128, seed=0):
  """A learnable in-memory data set: each class lights up its own block of pixels."""
  from jaxlab.data import DATASETS, Dataset

  info = DATASETS.get(name)
  rng = np.random.default_rng(seed)

  def split(n):
    labels = rng.integers(0, info.num_classes, n).astype(np.uint8)
    images = rng.integers(0, 80, (n,) + info.image_shape).astype(np.uint8)
    h = info.image_shape[0] // info.num_classes
    for i, c in enumerate(labels):
      images[i, c * h:(c + 1) * h, : info.image_shape[1] // 2] = 255
    return images, labels

  train_images, train_labels = split(n_train)
  test_images, test_labels = split(n_test)
  return Dataset(info, train_images, train_labels, test_images, test_labels, source="synthetic")


def random_dataset(name="mnist", n_train=256, n_test=64, seed=0):
  """An in-memory data set of random pixels and labels, for tests that compare two equivalent
  computations step by step (a vmapped group and single runs, one device and eight).

  Its images have no structure: where a max-pooling window holds tied (or nearly tied) values,
  its gradient goes to whichever of them float rounding makes largest, and the plain and
  ramped blocks of `synthetic_dataset` hold many such windows, so the rounding differences of
  two equivalent computations there become finite differences in the gradients (seen on an AMD
  EPYC machine: 2% after 4 steps with tied blocks, 0.25% with ramped ones; 3e-6 on these)."""
  from jaxlab.data import DATASETS, Dataset

  info = DATASETS.get(name)
  rng = np.random.default_rng(seed)
  train = random_split(rng, n_train, info.image_shape, info.num_classes)
  test = random_split(rng, n_test, info.image_shape, info.num_classes)
  return Dataset(info, *train, *test, source="random")
