"""The run directory: one run's settings and history, its checkpoints and its lock.

Read by anyone, JAX or not: only the checkpoint format (`checkpoint`) needs JAX and Flax. Its
files are written with `jaxlab.files` (atomic writes, JSON lines).
"""
