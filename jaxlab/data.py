"""Data sets as in-memory uint8 arrays with their train/test split: a registry of entries.

Each data set is an entry of `DATASETS` (a `DatasetInfo`): its image shape, its classes, and
its sources, each of which can find a copy of it and read it. `load_dataset(name)` takes the
first source that has the data. The built-in entries look in this order:

  mnist          the user's IDX files in `data_dir` (gzipped or not); a TFDS-prepared copy
  fashion_mnist  the user's IDX files; the Debian package `dataset-fashion-mnist`
                 (/usr/share/datasets/fashion-mnist); a TFDS-prepared copy
  cifar10        the user's CIFAR-10 python or binary tarball, or its extracted folder; a
                 TFDS-prepared copy

A TFDS-prepared copy is read with `tfds.data_source` (no TensorFlow needed); with
`download=True` TFDS may fetch and prepare one (needs TensorFlow). A data set of a user's own is
one call in a lab file:

  register_dataset("my_data", image_shape=(14, 14, 1), class_names=("a", "b"), load=load)

where `load()` returns (train_images, train_labels, test_images, test_labels) as NumPy arrays:
uint8 images (N, H, W, C) (or (N, H, W) for one channel) and integer labels in
[0, classes); a `load(data_dir)` gets the run's `--data_dir`. `--dataset=my_data` then works
wherever a built-in name does.

Arrays read from files are cached as .npy files, keyed by where they came from, so the second
load is a memory map away. Images are (N, H, W, C) uint8 and labels (N,) uint8; scaling to
float32 in [0, 1] happens on the device, inside the compiled steps.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import inspect
import io
import os
import pathlib
import pickle
import tarfile
import time
import traceback
from typing import Any, Callable, Sequence

import numpy as np
from absl import logging

from jaxlab import caches
from jaxlab.errors import BadValue, DataError
from jaxlab.files import write_atomic, write_json
from jaxlab.registry import Registry

DEBIAN_FASHION_MNIST_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049


@dataclasses.dataclass(frozen=True)
class Where:
  """Where a source may look: the user's `--data_dir`, whether TFDS may download, and the
  folder of the Debian package (a test points it elsewhere)."""

  data_dir: str | None = None
  download: bool = False
  debian_dir: pathlib.Path = DEBIAN_FASHION_MNIST_DIR


@dataclasses.dataclass(frozen=True)
class Source:
  """One place a data set may be: `find(info, where)` returns a `Found` copy, or None; `hint`
  says what a user does to provide one (for the error when no source has the data)."""

  find: Callable[[Any, Where], Any]
  hint: Callable[[Any, Where], str | None]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a data set is (its image shape and classes; its official split sizes, where it has
  them) and where to find it (its sources, in order)."""

  name: str
  image_shape: tuple[int, int, int]
  class_names: tuple[str, ...]
  sources: tuple[Source, ...] = ()
  train_size: int | None = None
  test_size: int | None = None

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def describe(self) -> dict[str, Any]:
    """For config.json: what a report needs to know of the data set without loading it."""
    return {"image_shape": list(self.image_shape), "class_names": list(self.class_names)}


DATASETS: Registry[DatasetInfo] = Registry("dataset")


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


def _raw_dirs(info: DatasetInfo, where: Where) -> list[pathlib.Path]:
  """`data_dir` and its folder named after the data set, where they exist."""
  if not where.data_dir:
    return []
  root = pathlib.Path(where.data_dir)
  return [d for d in (root, root / info.name) if d.is_dir()]


IDX_FILES = ("train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
             "t10k-labels-idx1-ubyte.gz (gzipped or not)")
CIFAR_FILES = ("cifar-10-python.tar.gz or cifar-10-binary.tar.gz (or their extracted folders "
               "cifar-10-batches-py / cifar-10-batches-bin)")


def _data_dir_hint(files: str) -> Callable[[DatasetInfo, Where], str]:
  def hint(info: DatasetInfo, where: Where) -> str:
    return (f"put {files} in a directory and pass "
            f"--data_dir={where.data_dir if where.data_dir else 'DIR'}")
  return hint


def _idx_found(info: DatasetInfo, directory: pathlib.Path, description: str) -> Found | None:
  files = _find_idx(directory)
  if not files:
    return None
  return Found(description, _file_key(list(files.values())),
               lambda: read_idx_dataset(files, info))


# The user's IDX files in --data_dir (or its folder named after the data set).
IDX_IN_DATA_DIR = Source(
    lambda info, where: next((found for d in _raw_dirs(info, where)
                              if (found := _idx_found(info, d, f"IDX files in {d}"))), None),
    _data_dir_hint(IDX_FILES))


def _find_cifar(info: DatasetInfo, where: Where) -> Found | None:
  for d in _raw_dirs(info, where):
    for tarball, folder, kind in CIFAR_SOURCES:
      for candidate in (d / tarball, d / folder):
        if candidate.exists():
          return Found(f"{candidate} ({kind} format)", _file_key([candidate]),
                       lambda c=candidate, k=kind: read_cifar10(c, k))
  return None


# The user's CIFAR-10 tarball (or its extracted folder) in --data_dir.
CIFAR_IN_DATA_DIR = Source(_find_cifar, _data_dir_hint(CIFAR_FILES))
# The IDX files of the Debian package dataset-fashion-mnist.
DEBIAN_FASHION_MNIST = Source(
    lambda info, where: _idx_found(info, where.debian_dir,
                                   f"Debian dataset-fashion-mnist ({where.debian_dir})"),
    lambda info, where: "or run `apt-get install -y dataset-fashion-mnist`")


def _tfds_source(tfds_name: str, data_dir: str | None, download: bool) -> dict:
  import tensorflow_datasets as tfds  # Imported here: the raw-file routes do not need it.

  return {split: tfds.data_source(tfds_name, split=split, data_dir=data_dir,
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


def _find_tfds(info: DatasetInfo, tfds_name: str, data_dir: str | None) -> Found | None:
  """A TFDS-prepared copy (array_record format) in `data_dir` or TFDS's own data folder.

  TFDS is asked only when a folder of that name exists there (so a machine without any copy
  never imports TFDS), and with `download=False`, which keeps it off the network.
  """
  folders = [root / tfds_name for root in tfds_roots(data_dir) if (root / tfds_name).is_dir()]
  if not folders:
    return None
  try:
    sources = _tfds_source(tfds_name, data_dir, download=False)
    if any(len(s) == 0 for s in sources.values()):
      return None
  except Exception as e:  # TFDS raises many types for a copy it cannot read.
    if not _raised_within(e, "tensorflow_datasets"):
      raise  # jaxlab's own code: a bug, with its traceback.
    logging.warning("%s: a TFDS folder of %s is there, but TFDS cannot read it (%s: %s); "
                    "looking elsewhere", ", ".join(map(str, folders)), tfds_name,
                    type(e).__name__, " ".join(str(e).split())[:300])
    return None
  first = next(iter(sources.values()))
  path = getattr(getattr(first, "dataset_info", None), "data_dir", None)
  # Only a copy on disk is cached; TFDS's test mocks have no files and are read each time.
  key = f"tfds:{path}" if path and pathlib.Path(str(path)).is_dir() else ""
  return Found(f"TFDS-prepared copy of {tfds_name!r}" + (f" in {path}" if path else ""),
               key, lambda: _tfds_read(sources, info))


def _raised_within(error: BaseException, package: str) -> bool:
  """Whether `error` arose in a call into `package` (a frame of its traceback is in it)."""
  frames = traceback.extract_tb(error.__traceback__)
  return any(f"{os.sep}{package}{os.sep}" in frame.filename for frame in frames)


def tfds(tfds_name: str) -> Source:
  """TFDS's copy of `tfds_name`: a prepared one, or with `download` one TFDS fetches."""

  def find(info: DatasetInfo, where: Where) -> Found | None:
    found = _find_tfds(info, tfds_name, where.data_dir)
    if found is None and where.download:
      return Found(f"TFDS download of {tfds_name!r}", "", lambda: _tfds_read(
          _tfds_source(tfds_name, where.data_dir, download=True), info))
    return found

  def hint(info: DatasetInfo, where: Where) -> str:
    return (f"or prepare it with TFDS (`tfds build {tfds_name} --file_format=array_record`, "
            "which needs TensorFlow) into --data_dir or ~/tensorflow_datasets; or pass "
            "--download to let TFDS fetch it (needs network and TensorFlow)")

  return Source(find, hint)


def find_source(info: DatasetInfo, data_dir: str | None = None, download: bool = False,
                debian_dir: pathlib.Path | None = None) -> Found:
  """The first of the data set's sources that has it (`debian_dir`: the Debian package's folder,
  `DEBIAN_FASHION_MNIST_DIR` unless given)."""
  if data_dir and not pathlib.Path(data_dir).is_dir():
    raise DataError(f"--data_dir {data_dir!r} is not a directory")
  where = Where(data_dir, download, debian_dir or DEBIAN_FASHION_MNIST_DIR)
  for source in info.sources:
    found = source.find(info, where)
    if found:
      return found
  hints = [h for h in (source.hint(info, where) for source in info.sources) if h]
  raise DataError(f"data set {info.name!r} was not found: " + "; ".join(hints))


# ----------------------------------------------------------------------------- registry


def register_dataset(name: str, *, image_shape: Sequence[int], class_names: Sequence[str],
                     load: Callable[[], Sequence[np.ndarray]]) -> DatasetInfo:
  """A data set of the user's own, from `load()` -> (train_images, train_labels, test_images,
  test_labels): uint8 images (N, H, W, C), or (N, H, W) for one channel, and integer labels in
  [0, len(class_names)); a `load` with a `data_dir` parameter is given the run's --data_dir.
  Registered as `name` for `--dataset` (a lab file calls this)."""
  shape = tuple(int(d) for d in image_shape)
  if len(shape) != 3 or min(shape) < 1:
    raise BadValue(f"data set {name!r}: image_shape must be (height, width, channels), got "
                   f"{tuple(image_shape)}")
  if len(class_names) < 2:
    raise BadValue(f"data set {name!r}: give at least two class_names, got {list(class_names)}")
  if not callable(load):
    raise BadValue(f"data set {name!r}: load must be a function, got {load!r}")
  if name in DATASETS:
    raise BadValue(f"data set name {name!r} is already taken; choose another name")
  named = f"{getattr(load, '__module__', '?')}.{getattr(load, '__qualname__', 'load')}"
  takes_dir = "data_dir" in inspect.signature(load).parameters

  def find(info: DatasetInfo, where: Where) -> Found:
    call = (lambda: load(data_dir=where.data_dir)) if takes_dir else load
    return Found(f"{named}()", "", lambda: _loaded(info, call()))

  source = Source(find, lambda info, where: None)
  return DATASETS.register(name, DatasetInfo(name, shape, tuple(map(str, class_names)),
                                             (source,)))


def _loaded(info: DatasetInfo, arrays: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
  """A load function's four arrays, named, with the channel axis of one-channel images added
  and integer labels as uint8 (`_validate` checks the rest)."""
  if not isinstance(arrays, (tuple, list)) or len(arrays) != len(ARRAY_NAMES):
    raise DataError(f"data set {info.name!r}: its load function returned "
                    f"{type(arrays).__name__}, not ({', '.join(ARRAY_NAMES)})")
  named = dict(zip(ARRAY_NAMES, (np.asarray(a) for a in arrays)))
  for key in ("train_images", "test_images"):
    if named[key].ndim == 3 and info.image_shape[-1] == 1:
      named[key] = named[key][..., None]
  for key in ("train_labels", "test_labels"):
    labels = named[key]
    if not np.issubdtype(labels.dtype, np.integer) or (labels.size and labels.min() < 0):
      raise DataError(f"data set {info.name!r}: {key} must be integers in [0, "
                      f"{info.num_classes}), got {labels.dtype}")
    named[key] = labels.astype(np.uint8) if labels.size and labels.max() < 256 else labels
  return named


for _info in (
    DatasetInfo("mnist", (28, 28, 1), tuple(str(d) for d in range(10)),
                (IDX_IN_DATA_DIR, tfds("mnist")), 60000, 10000),
    DatasetInfo("fashion_mnist", (28, 28, 1),
                ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                 "Sneaker", "Bag", "Ankle boot"),
                (IDX_IN_DATA_DIR, DEBIAN_FASHION_MNIST, tfds("fashion_mnist")), 60000, 10000),
    DatasetInfo("cifar10", (32, 32, 3),
                ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                 "truck"), (CIFAR_IN_DATA_DIR, tfds("cifar10")), 50000, 10000),
):
  DATASETS.register(_info.name, _info)


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
    if expected is not None and len(labels) != expected:
      logging.warning("%s: %s split has %d examples; the official split has %d", origin, split,
                      len(labels), expected)


def load_dataset(name: str, data_dir: str | None = None, download: bool = False,
                 cache_dir: str | os.PathLike | None = None, use_cache: bool = True,
                 debian_dir: pathlib.Path | None = None) -> Dataset:
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
