"""Test-wide settings: no network, no shared caches, Keras on its JAX backend."""

import os
import pathlib
import sys
import tempfile

# Everything a test run reads or writes stays in a temporary folder: the data cache, and an
# empty TFDS data folder, so that no test can find (or fetch) a real TFDS copy.
_TMP = pathlib.Path(tempfile.mkdtemp(prefix="jaxlab-tests-"))
os.environ["JAXLAB_CACHE_DIR"] = str(_TMP / "cache")
os.environ["TFDS_DATA_DIR"] = str(_TMP / "tensorflow_datasets")
os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, str(pathlib.Path(__file__).parent))

# Tests build the same small models many times: let identical programs compile once per run.
import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", str(_TMP / "xla_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
