"""Each data source, the cache, and the errors for missing and corrupt data."""

import gzip
import pathlib
import socket
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxlab import data
from datafiles import idx_bytes, write_cifar10, write_idx_dataset

NO_DEBIAN = pathlib.Path("/nonexistent/debian")


def assert_arrays(ds: data.Dataset, arrays: dict) -> None:
  for key, value in arrays.items():
    got = getattr(ds, key)
    if key.endswith("images") and value.ndim == 3:
      value = value[..., None]
    np.testing.assert_array_equal(got, value, err_msg=key)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_files_from_data_dir(tmp_path, gz):
  arrays = write_idx_dataset(tmp_path / "raw", gz=gz)
  ds = data.load_dataset("mnist", data_dir=str(tmp_path / "raw"), use_cache=False,
                         debian_dir=NO_DEBIAN)
  assert ds.train_images.shape == (64, 28, 28, 1) and ds.train_images.dtype == np.uint8
  assert_arrays(ds, arrays)
  assert "IDX files" in ds.source


def test_idx_files_in_dataset_subfolder(tmp_path):
  arrays = write_idx_dataset(tmp_path / "fashion_mnist")
  ds = data.load_dataset("fashion_mnist", data_dir=str(tmp_path), use_cache=False,
                         debian_dir=NO_DEBIAN)
  assert_arrays(ds, arrays)


def test_debian_fashion_mnist_files(tmp_path):
  arrays = write_idx_dataset(tmp_path / "debian")
  ds = data.load_dataset("fashion_mnist", use_cache=False, debian_dir=tmp_path / "debian")
  assert_arrays(ds, arrays)
  assert "Debian" in ds.source


def test_user_files_win_over_debian(tmp_path):
  write_idx_dataset(tmp_path / "debian", seed=1)
  user = write_idx_dataset(tmp_path / "user", seed=2)
  ds = data.load_dataset("fashion_mnist", data_dir=str(tmp_path / "user"), use_cache=False,
                         debian_dir=tmp_path / "debian")
  assert_arrays(ds, user)


@pytest.mark.parametrize("kind", ["python", "binary"])
def test_cifar10_tarballs(tmp_path, kind):
  arrays, _ = write_cifar10(tmp_path, kind)
  ds = data.load_dataset("cifar10", data_dir=str(tmp_path), use_cache=False)
  assert ds.train_images.shape == (20, 32, 32, 3) and ds.test_images.shape == (4, 32, 32, 3)
  assert_arrays(ds, arrays)


def test_cifar10_extracted_folder(tmp_path):
  arrays, path = write_cifar10(tmp_path / "tar", "python")
  import tarfile
  with tarfile.open(path) as tar:
    tar.extractall(tmp_path / "extracted", filter="data")
  ds = data.load_dataset("cifar10", data_dir=str(tmp_path / "extracted"), use_cache=False)
  assert_arrays(ds, arrays)


@pytest.mark.parametrize("name,shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_tfds_prepared_copy(tmp_path, name, shape):
  (tmp_path / name).mkdir()  # TFDS's folder for the data set; mock_data serves its records.
  with tfds.testing.mock_data(num_examples=12):
    ds = data.load_dataset(name, data_dir=str(tmp_path), use_cache=False, debian_dir=NO_DEBIAN)
  assert ds.train_images.shape == (12,) + shape and ds.train_images.dtype == np.uint8
  assert ds.test_labels.shape == (12,) and ds.test_labels.max() < 10
  assert "TFDS" in ds.source


def test_missing_data_fails_without_network_with_instructions(tmp_path, monkeypatch):
  def no_network(*args, **kwargs):
    raise AssertionError("loading tried the network")

  monkeypatch.setattr(socket.socket, "connect", no_network)
  monkeypatch.setattr(socket, "create_connection", no_network)
  with pytest.raises(data.DataError) as e:
    data.load_dataset("mnist", data_dir=str(tmp_path), debian_dir=NO_DEBIAN)
  message = str(e.value)
  assert "'mnist'" in message and "train-images-idx3-ubyte.gz" in message
  assert "--data_dir" in message and "--download" in message


def test_missing_fashion_mnist_names_the_debian_package(tmp_path):
  with pytest.raises(data.DataError, match="apt-get install -y dataset-fashion-mnist"):
    data.load_dataset("fashion_mnist", data_dir=str(tmp_path), debian_dir=NO_DEBIAN)


def test_unknown_dataset_lists_known_names():
  with pytest.raises(LookupError, match="mnist, fashion_mnist, cifar10"):
    data.load_dataset("imagenet")


def test_data_dir_must_exist(tmp_path):
  with pytest.raises(data.DataError, match="not a directory"):
    data.load_dataset("mnist", data_dir=str(tmp_path / "nope"))


def _corrupt(tmp_path, stem, payload: bytes):
  raw = tmp_path / "raw"
  write_idx_dataset(raw)
  (raw / f"{stem}.gz").write_bytes(payload)
  return raw


def gz(data):
  """`data` gzipped with a fixed time: every xdist worker collects the same parameters."""
  return gzip.compress(data, mtime=0)


@pytest.mark.parametrize("stem,payload,match", [
    ("train-images-idx3-ubyte", gz(idx_bytes(np.zeros((3, 28, 28)))[:-5]), "header says"),
    ("train-labels-idx1-ubyte", gz(idx_bytes(np.zeros((3, 28, 28)))),
     "bad IDX magic number 2051, expected 2049"),
    ("t10k-images-idx3-ubyte", b"\x1f\x8b\x08garbage", "corrupt gzip"),
    ("t10k-images-idx3-ubyte", gz(idx_bytes(np.zeros((32, 14, 14)))), r"shape \(32, 14, 14\)"),
    ("train-labels-idx1-ubyte", gz(idx_bytes(np.zeros((63,)))), "64 images .* but 63 labels"),
    ("train-labels-idx1-ubyte", gz(idx_bytes(np.full((64,), 10))),
     r"label 10 is out of range \[0, 10\)"),
    ("train-images-idx3-ubyte", gz(b"\x00\x00"), "too short"),
], ids=["truncated", "labels_magic", "corrupt_gzip", "image_shape", "label_count", "label_range",
        "too_short"])
def test_corrupt_idx_files_are_named(tmp_path, stem, payload, match):
  raw = _corrupt(tmp_path, stem, payload)
  with pytest.raises(data.DataError, match=match):
    data.load_dataset("mnist", data_dir=str(raw), use_cache=False)


def test_corrupt_cifar_tarballs(tmp_path):
  (tmp_path / "cifar-10-binary.tar.gz").write_bytes(b"not a tarball")
  with pytest.raises(data.DataError, match="not a readable tar archive"):
    data.load_dataset("cifar10", data_dir=str(tmp_path), use_cache=False)


def test_second_load_comes_from_the_cache(tmp_path, monkeypatch):
  arrays = write_idx_dataset(tmp_path / "raw")
  kwargs = dict(data_dir=str(tmp_path / "raw"), cache_dir=tmp_path / "cache", debian_dir=NO_DEBIAN)
  data.load_dataset("mnist", **kwargs)

  def fail(*args, **kw):
    raise AssertionError("the raw files were read again")

  monkeypatch.setattr(data, "read_idx_dataset", fail)
  ds = data.load_dataset("mnist", **kwargs)
  assert_arrays(ds, arrays)


def test_changed_files_invalidate_the_cache(tmp_path):
  kwargs = dict(data_dir=str(tmp_path / "raw"), cache_dir=tmp_path / "cache", debian_dir=NO_DEBIAN)
  write_idx_dataset(tmp_path / "raw", seed=1)
  data.load_dataset("mnist", **kwargs)
  time.sleep(0.01)
  arrays = write_idx_dataset(tmp_path / "raw", n_train=16, seed=2)
  assert_arrays(data.load_dataset("mnist", **kwargs), arrays)


def test_train_limit_keeps_the_first_examples(tmp_path):
  arrays = write_idx_dataset(tmp_path / "raw")
  ds = data.load_dataset("mnist", data_dir=str(tmp_path / "raw"), use_cache=False)
  small = ds.limit_train(10)
  np.testing.assert_array_equal(small.train_labels, arrays["train_labels"][:10])
  assert len(small.test_labels) == 32
  with pytest.raises(ValueError, match="train_limit must be positive, got 0"):
    ds.limit_train(0)


def test_class_names():
  assert data.DATASETS.get("fashion_mnist").class_names[6] == "Shirt"
  assert data.DATASETS.get("cifar10").class_names[9] == "truck"
  assert all(data.DATASETS.get(n).num_classes == 10 for n in data.DATASETS)
