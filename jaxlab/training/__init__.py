"""The training core: train state, compiled steps, the epoch loop and what it saves.

The train state (`state`), the compiled steps (`steps`) and their data parallelism
(`parallel`), the epoch loop (`train`) with each run's own files (`runfiles`) and the hooks a
user adds (`hooks`), train states read back (`restore`), the process a run trains in
(`process`) and XLA:CPU's kernel choice (`kernels`, which imports no JAX: it runs before JAX
starts).
"""
