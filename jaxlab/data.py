"""Data sets as in-memory uint8 arrays with the official train/test split.

`load_dataset(name)` looks for the data in this order and takes the first source that has it:

1. the user's raw files in `data_dir` (IDX files, gzipped or not, for MNIST and
   Fashion-MNIST; the CIFAR-10 python or binary tarball, or its extracted folder);
2. the Debian package `dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist);
3. a TFDS-prepared copy, read with `tfds.data_source` (no TensorFlow needed);
4. a TFDS download and preparation, only when `download=True` (needs TensorFlow).

Decoded arrays are cached as .npy files, keyed by where they came from, so the second
load is a memory map away. Images are (N, H, W, C) uint8 and labels (N,) uint8; scaling to
float32 in [0, 1] happens on the device, inside the compiled steps.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import pathlib
import pickle
import tarfile
import time
from typing import Any, Callable

import numpy as np
from absl import logging

from jaxlab import caches
from jaxlab.errors import DataError
from jaxlab.files import write_atomic, write_json
from jaxlab.registry import Registry

DEBIAN_FASHION_MNIST_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a data set is: its image shape, classes and official split sizes."""

  name: str
  image_shape: tuple[int, int, int]
  class_names: tuple[str, ...]
  train_size: int
  test_size: int
  tfds_name: str
  raw_files: str  # What a user puts in --data_dir, for error messages and the README.

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


DATASETS: Registry[DatasetInfo] = Registry("dataset")
for _info in (
    DatasetInfo("mnist", (28, 28, 1), tuple(str(d) for d in range(10)), 60000, 10000, "mnist",
                "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
                "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz (gzipped or not)"),
    DatasetInfo("fashion_mnist", (28, 28, 1),
                ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                 "Sneaker", "Bag", "Ankle boot"), 60000, 10000, "fashion_mnist",
                "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
                "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz (gzipped or not)"),
    DatasetInfo("cifar10", (32, 32, 3),
                ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                 "truck"), 50000, 10000, "cifar10",
                "cifar-10-python.tar.gz or cifar-10-binary.tar.gz (or their extracted folders "
                "cifar-10-batches-py / cifar-10-batches-bin)"),
):
  DATASETS.register(_info.name, _info)


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A data set in memory: uint8 images (N, H, W, C) and uint8 labels (N,) per split."""

  info: DatasetInfo
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  source: str  # Where the arrays came from, for config.json.

  def limit_train(self, n: int | None) -> "Dataset":
    """The same data set with only the first `n` training examples."""
    if n is None or n >= len(self.train_labels):
      return self
    if n <= 0:
      raise ValueError(f"train_limit must be positive, got {n}")
    return dataclasses.replace(self, train_images=self.train_images[:n],
                               train_labels=self.train_labels[:n])


# ----------------------------------------------------------------------------- readers


def _open_maybe_gzip(path: pathlib.Path) -> bytes:
  raw = path.read_bytes()
  if raw[:2] == b"\x1f\x8b":
    try:
      return gzip.decompress(raw)
    except (OSError, EOFError) as e:
      raise DataError(f"{path}: corrupt gzip data ({e})") from None
  return raw


def read_idx(path: pathlib.Path, expected_magic: int) -> np.ndarray:
  """Reads an IDX file (gzipped or not) of unsigned bytes, checking its header."""
  data = _open_maybe_gzip(path)
  if len(data) < 8:
    raise DataError(f"{path}: too short to be an IDX file ({len(data)} bytes)")
  magic = int.from_bytes(data[:4], "big")
  if magic != expected_magic:
    raise DataError(f"{path}: bad IDX magic number {magic}, expected {expected_magic}")
  ndim = data[3]
  header = 4 + 4 * ndim
  dims = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
  size = int(np.prod(dims))
  if len(data) - header != size:
    raise DataError(f"{path}: header says {dims} ({size} bytes of data) but the file holds "
                    f"{len(data) - header} bytes")
  return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _find_idx(directory: pathlib.Path) -> dict[str, pathlib.Path] | None:
  """The four IDX files in `directory` (plain or .gz), or None when any is missing."""
  found = {}
  for key, stem in IDX_NAMES.items():
    for candidate in (directory / (stem + ".gz"), directory / stem,
                      directory / stem.replace("-idx", ".idx")):
      if candidate.is_file():
        found[key] = candidate
        break
    else:
      return None
  return found


def read_idx_dataset(files: dict[str, pathlib.Path], info: DatasetInfo) -> dict[str, np.ndarray]:
  arrays = {}
  for split in ("train", "test"):
    images = read_idx(files[f"{split}_images"], IDX_IMAGES_MAGIC)
    labels = read_idx(files[f"{split}_labels"], IDX_LABELS_MAGIC)
    if images.ndim != 3 or images.shape[1:] != info.image_shape[:2]:
      raise DataError(f"{files[f'{split}_images']}: images have shape {images.shape}, expected "
                      f"(N, {info.image_shape[0]}, {info.image_shape[1]})")
    if labels.ndim != 1:
      raise DataError(f"{files[f'{split}_labels']}: labels have shape {labels.shape}, expected (N,)")
    if len(images) != len(labels):
      raise DataError(f"{split} split: {len(images)} images in {files[f'{split}_images']} but "
                      f"{len(labels)} labels in {files[f'{split}_labels']}")
    arrays[f"{split}_images"] = images[..., None]
    arrays[f"{split}_labels"] = labels
  return arrays


def _cifar_from_batches(batches: dict[str, bytes], kind: str, origin: str) -> dict[str, np.ndarray]:
  """CIFAR-10 arrays from the raw contents of its batch files (python pickles or binary)."""
  splits = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
  arrays = {}
  for split, names in splits.items():
    images, labels = [], []
    for name in names:
      key = name + (".bin" if kind == "binary" else "")
      if key not in batches:
        raise DataError(f"{origin}: CIFAR-10 {kind} batch {key!r} is missing")
      raw = batches[key]
      if kind == "python":
        try:
          batch = pickle.loads(raw, encoding="bytes")
          data = np.asarray(batch[b"data"], dtype=np.uint8)
          lab = np.asarray(batch[b"labels"], dtype=np.uint8)
        except Exception as e:  # A corrupt pickle can raise almost anything.
          raise DataError(f"{origin}: {key} is not a CIFAR-10 python batch ({e!r})") from None
      else:
        if len(raw) % 3073:
          raise DataError(f"{origin}: {key} holds {len(raw)} bytes, not a multiple of the "
                          "3073-byte CIFAR-10 record")
        records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3073)
        lab, data = records[:, 0].copy(), records[:, 1:]
      if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(lab):
        raise DataError(f"{origin}: {key} holds data of shape {data.shape} and {len(lab)} labels; "
                        "expected (N, 3072) and N labels")
      images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # CHW planes -> HWC.
      labels.append(lab)
    arrays[f"{split}_images"] = np.ascontiguousarray(np.concatenate(images))
    arrays[f"{split}_labels"] = np.concatenate(labels)
  return arrays


CIFAR_SOURCES = (
    ("cifar-10-python.tar.gz", "cifar-10-batches-py", "python"),
    ("cifar-10-binary.tar.gz", "cifar-10-batches-bin", "binary"),
)


def read_cifar10(path: pathlib.Path, kind: str) -> dict[str, np.ndarray]:
  """CIFAR-10 from its python or binary tarball, or from the tarball's extracted folder."""
  batches: dict[str, bytes] = {}
  if path.is_dir():
    for f in path.iterdir():
      if f.is_file():
        batches[f.name] = f.read_bytes()
  else:
    try:
      with tarfile.open(path) as tar:
        for member in tar.getmembers():
          if member.isfile():
            batches[pathlib.PurePosixPath(member.name).name] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as e:
      raise DataError(f"{path}: not a readable tar archive ({e})") from None
  return _cifar_from_batches(batches, kind, str(path))


# ----------------------------------------------------------------------------- sources


@dataclasses.dataclass(frozen=True)
class Found:
  """A source that has the data: a description, a cache key and a reader."""

  description: str
  key: str
  read: Callable[[], dict[str, np.ndarray]]


def _file_key(paths: list[pathlib.Path]) -> str:
  parts = []
  for p in paths:
    st = p.stat()
    parts.append(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}")
  return "|".join(parts)


def _find_raw(info: DatasetInfo, directory: pathlib.Path) -> Found | None:
  for d in (directory, directory / info.name):
    if not d.is_dir():
      continue
    if info.name == "cifar10":
      for tarball, folder, kind in CIFAR_SOURCES:
        for candidate in (d / tarball, d / folder):
          if candidate.exists():
            return Found(f"{candidate} ({kind} format)", _file_key([candidate]),
                         lambda c=candidate, k=kind: read_cifar10(c, k))
    else:
      files = _find_idx(d)
      if files:
        return Found(f"IDX files in {d}", _file_key(list(files.values())),
                     lambda f=files: read_idx_dataset(f, info))
  return None


def _tfds_source(info: DatasetInfo, data_dir: str | None, download: bool) -> dict:
  import tensorflow_datasets as tfds  # Imported here: the raw-file routes do not need it.

  return {split: tfds.data_source(info.tfds_name, split=split, data_dir=data_dir,
                                  download=download) for split in ("train", "test")}


def _tfds_read(sources: dict, info: DatasetInfo) -> dict[str, np.ndarray]:
  arrays = {}
  for split, source in sources.items():
    n = len(source)
    images = np.empty((n,) + info.image_shape, np.uint8)
    labels = np.empty((n,), np.uint8)
    for i in range(n):  # One record at a time: TFDS decodes each image (PNG) as it reads.
      example = source[i]
      images[i] = example["image"]
      labels[i] = example["label"]
    arrays[f"{split}_images"] = images
    arrays[f"{split}_labels"] = labels
  return arrays


def tfds_roots(data_dir: str | None) -> list[pathlib.Path]:
  """Where a TFDS-prepared copy may be: `data_dir`, then TFDS's data folder."""
  roots = [pathlib.Path(data_dir)] if data_dir else []
  roots.append(pathlib.Path(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")).expanduser())
  return roots


def _find_tfds(info: DatasetInfo, data_dir: str | None) -> Found | None:
  """A TFDS-prepared copy (array_record format) in `data_dir` or TFDS's own data folder.

  TFDS is asked only when a folder of that name exists there (so a machine without any copy
  never imports TFDS), and with `download=False`, which keeps it off the network.
  """
  if not any((root / info.tfds_name).is_dir() for root in tfds_roots(data_dir)):
    return None
  try:
    sources = _tfds_source(info, data_dir, download=False)
    if any(len(s) == 0 for s in sources.values()):
      return None
  except Exception as e:  # TFDS raises many types for "not prepared here".
    logging.debug("No TFDS-prepared %s: %r", info.name, e)
    return None
  first = next(iter(sources.values()))
  path = getattr(getattr(first, "dataset_info", None), "data_dir", None)
  # Only a copy on disk is cached; TFDS's test mocks have no files and are read each time.
  key = f"tfds:{path}" if path and pathlib.Path(str(path)).is_dir() else ""
  return Found(f"TFDS-prepared copy of {info.tfds_name!r}" + (f" in {path}" if path else ""),
               key, lambda: _tfds_read(sources, info))


def find_source(info: DatasetInfo, data_dir: str | None = None, download: bool = False,
                debian_dir: pathlib.Path = DEBIAN_FASHION_MNIST_DIR) -> Found:
  """The first source that has the data set, in the order the module docstring gives."""
  if data_dir:
    if not pathlib.Path(data_dir).is_dir():
      raise DataError(f"--data_dir {data_dir!r} is not a directory")
    found = _find_raw(info, pathlib.Path(data_dir))
    if found:
      return found
  if info.name == "fashion_mnist":
    files = _find_idx(debian_dir)
    if files:
      return Found(f"Debian dataset-fashion-mnist ({debian_dir})", _file_key(list(files.values())),
                   lambda: read_idx_dataset(files, info))
  found = _find_tfds(info, data_dir)
  if found:
    return found
  if download:
    return Found(f"TFDS download of {info.tfds_name!r}", "",
                 lambda: _tfds_read(_tfds_source(info, data_dir, download=True), info))
  where = f"--data_dir={data_dir}" if data_dir else "--data_dir=DIR"
  hints = [f"put {info.raw_files} in a directory and pass {where}"]
  if info.name == "fashion_mnist":
    hints.append("or run `apt-get install -y dataset-fashion-mnist`")
  hints.append(f"or prepare it with TFDS (`tfds build {info.tfds_name} --file_format=array_record`, "
               "which needs TensorFlow) into --data_dir or ~/tensorflow_datasets")
  hints.append("or pass --download to let TFDS fetch it (needs network and TensorFlow)")
  raise DataError(f"data set {info.name!r} was not found: " + "; ".join(hints))


# ----------------------------------------------------------------------------- cache


ARRAY_NAMES = ("train_images", "train_labels", "test_images", "test_labels")


def _validate(arrays: dict[str, np.ndarray], info: DatasetInfo, origin: str) -> None:
  for split in ("train", "test"):
    images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
    if images.dtype != np.uint8 or images.shape[1:] != info.image_shape:
      raise DataError(f"{origin}: {split} images are {images.dtype}{images.shape}, expected "
                      f"uint8 (N, {', '.join(map(str, info.image_shape))})")
    if len(images) != len(labels) or len(labels) == 0:
      raise DataError(f"{origin}: {split} split has {len(images)} images and {len(labels)} labels")
    if labels.max() >= info.num_classes:
      raise DataError(f"{origin}: {split} label {int(labels.max())} is out of range "
                      f"[0, {info.num_classes})")
    expected = info.train_size if split == "train" else info.test_size
    if len(labels) != expected:
      logging.warning("%s: %s split has %d examples; the official split has %d", origin, split,
                      len(labels), expected)


def load_dataset(name: str, data_dir: str | None = None, download: bool = False,
                 cache_dir: str | os.PathLike | None = None, use_cache: bool = True,
                 debian_dir: pathlib.Path = DEBIAN_FASHION_MNIST_DIR) -> Dataset:
  """Loads a data set by name from the first source that has it (see the module doc)."""
  info = DATASETS.get(name)
  found = find_source(info, data_dir, download, debian_dir)
  cache = None
  if use_cache and found.key:
    digest = hashlib.sha256(found.key.encode()).hexdigest()[:16]
    cache = pathlib.Path(cache_dir or caches.cache_dir()) / f"{name}-{digest}"
    if (cache / "done.json").is_file():
      arrays = {k: np.load(cache / f"{k}.npy", mmap_mode="r") for k in ARRAY_NAMES}
      logging.info("Loaded %s from the cache %s (source: %s)", name, cache, found.description)
      return Dataset(info, **{k: np.asarray(v) for k, v in arrays.items()},
                     source=found.description)
  start = time.perf_counter()
  logging.info("Reading %s from %s", name, found.description)
  try:
    arrays = found.read()
  except OSError as e:  # A file it found but may not read (permissions, an I/O error).
    raise DataError(f"{found.description}: cannot be read ({e})") from e
  _validate(arrays, info, found.description)
  logging.info("Read %s in %.1f s", name, time.perf_counter() - start)
  if cache is not None:
    _write_cache(cache, arrays, found)
  return Dataset(info, **{k: arrays[k] for k in ARRAY_NAMES}, source=found.description)


def _write_cache(cache: pathlib.Path, arrays: dict[str, np.ndarray], found: Found) -> None:
  """Writes the arrays, then the marker: a crash midway leaves no cache that looks complete."""
  try:
    for k in ARRAY_NAMES:
      npy = io.BytesIO()
      np.save(npy, arrays[k])
      write_atomic(cache / f"{k}.npy", npy.getvalue())
    write_json(cache / "done.json", {"source": found.description, "key": found.key})
  except OSError as e:  # A read-only home or a full disk must not stop a run.
    logging.warning("Could not write the data cache %s: %s", cache, e)
