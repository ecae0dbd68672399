"""Data parallelism over every device of every process, with JAX's own sharding and runtime.

- `data_mesh(n)`: a one-dimensional mesh ("data") over the devices of all processes
  (`jax.make_mesh`); parameters, BatchNorm statistics and optimizer state are replicated on it,
  and every global batch is split along it. The compiled steps gather each device's share of
  a batch from the data set (replicated on every device, as uint8) and XLA's partitioner adds
  the all-reduces: BatchNorm statistics and gradients are those of the global batch, so N
  devices compute what one does, up to the order of float sums.
- `initialize(...)`: `jax.distributed.initialize` from explicit flags, or from JAX's own
  cluster detection (SLURM, Open MPI, Kubernetes) when a launcher set the environment.
- `is_writer()`: only process 0 writes checkpoints, metrics, event files and reports.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlab.errors import BadValue

AXIS = "data"


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Joins a multi-process run. Explicit settings win; without them, a launcher's environment
  (SLURM, Open MPI, Kubernetes JobSet) is read by JAX (`jaxlab.training.process.start` calls this
  where there is one)."""
  given = [v is not None for v in (coordinator_address, num_processes, process_id)]
  if any(given) and not all(given):
    raise BadValue("--coordinator_address, --num_processes and --process_id go together "
                   "(or none of them, to let JAX read a launcher's environment)")
  if num_processes is not None and not 0 <= process_id < num_processes:
    raise BadValue(f"--process_id must be in [0, {num_processes}), got {process_id}")
  # CPU devices need an implementation of collectives across processes (gloo ships with
  # jaxlib); GPUs use NCCL and ignore this. Asking for the backend here would start it too early.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if all(given):
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  else:
    jax.distributed.initialize()


def data_mesh(num_devices: int | None = None) -> Mesh:
  """The mesh of data parallelism: every device of every process, or the first `num_devices`
  (of a single process)."""
  devices = jax.devices()
  if num_devices is not None:
    if num_devices < 1 or num_devices > len(devices):
      raise BadValue(f"--num_devices must be between 1 and the {len(devices)} devices JAX "
                     f"sees, got {num_devices}")
    if num_devices != len(devices) and jax.process_count() > 1:
      raise BadValue(f"--num_devices={num_devices}: a run of {jax.process_count()} processes "
                     f"uses all their {len(devices)} devices")
    devices = devices[:num_devices]
  return jax.make_mesh((len(devices),), (AXIS,), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def split(mesh: Mesh) -> NamedSharding:
  """The leading (batch) axis split across the mesh."""
  return NamedSharding(mesh, PartitionSpec(AXIS))


def shard_batch(x: jax.Array, mesh: Mesh | None) -> jax.Array:
  """Inside a compiled step: the batch `x` split across the mesh when the mesh divides it (a
  smaller last batch that it does not divide is computed whole on every device)."""
  if mesh is None or mesh.size == 1 or x.shape[0] % mesh.size:
    return x
  return jax.lax.with_sharding_constraint(x, split(mesh))


def replicate(tree: Any, mesh: Mesh | None) -> Any:
  """Inside a compiled step: `tree` replicated on every device of the mesh."""
  if mesh is None:
    return tree
  return jax.lax.with_sharding_constraint(tree, replicated(mesh))


def put_replicated(tree: Any, mesh: Mesh) -> Any:
  """Host arrays (the same in every process) placed on every device of the mesh."""
  return jax.device_put(tree, replicated(mesh))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  if batch_size % mesh.size:
    raise BadValue(f"batch_size {batch_size} is not divisible by the {mesh.size} devices of "
                   f"the mesh: use a multiple of {mesh.size}, or --num_devices")


def is_writer() -> bool:
  """Whether this process writes the run's files (process 0 of a multi-process run)."""
  return jax.process_index() == 0


def sync(name: str) -> None:
  """Waits until every process got here (a no-op in a single process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
  """Whether `flag` is true in any process (every process must call this at the same point)."""
  if jax.process_count() == 1:
    return flag
  return bool(multihost_utils.process_allgather(int(flag)).max())


def describe(mesh: Mesh) -> dict[str, Any]:
  """For config.json: the mesh's devices and the processes that hold them."""
  return {"axis": AXIS, "devices": mesh.size, "processes": jax.process_count(),
          "process_index": jax.process_index(),
          "device_kinds": sorted({d.device_kind for d in mesh.devices.flat})}
