"""Side-by-side training benchmark: jaxlab's loop, Keras 3 `fit` (JAX backend), PyTorch eager.

All three train the same architecture (built from the same plan: Keras and PyTorch peers need a
model of the plan families; any experiment's model times jaxlab's own loops), with the same
batch size, optimizer (Adam, Keras's defaults) and random data of the right shape, in one
process. Each loop
is set up once and warmed up with one epoch (which holds compilation); then the timed epochs
run in rounds, one epoch of every loop per round, the loops' order rotating from round to round.
Interleaving puts every loop under the same machine conditions (a VM's speed drifts over a
run), so the per-round ratios are paired comparisons. Each loop reports the median of its
epochs; the FLOP floor is the epoch's Dense/Conv2D FLOPs over a matrix-multiply peak measured in
the same run, after every round: the best of those measurements, so that a slow moment of the
machine does not lower the floor.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Any, Callable

import dataclasses

import jax
import numpy as np

from jaxlab.errors import BadValue, MissingDependency
from jaxlab.models import at_precision, input_shape, iter_ops, op_precisions, plan_of, walk
from jaxlab.training.kernels import cpu
from jaxlab.training.process import environment
from jaxlab.training.state import Setup
from jaxlab.inspection.summary import forward_flops, layer_output_shapes


def random_data(built: Setup, examples: int, num_classes: int, seed: int = 0):
  """Random uint8 images of the setup's example shape and labels of `num_classes`."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (examples, *built.example_shape), dtype=np.uint8)
  labels = rng.integers(0, num_classes, (examples,), dtype=np.uint8)
  return images, labels


def _inputs(built: Setup, images: np.ndarray) -> np.ndarray:
  """uint8 images as a peer's model takes them: float32 in [0, 1], in its first layer's shape."""
  shape = input_shape(built.model, built.example_shape)
  return (images.astype(np.float32) / 255.0).reshape((len(images), *shape))


# An epoch runner trains one more epoch each call and returns that epoch's seconds.
EpochRunner = Callable[[], float]


def jaxlab_runner(built: Setup, images, labels, batch_size: int,
                  steps_per_dispatch: int = 50, members: int = 1,
                  sharded: bool = True) -> EpochRunner:
  """jaxlab's own loop: `train_epoch` with its compiled, scanned and donated steps, training
  `members` seeds as one vmapped group; data parallel over every device (as train.py runs), or
  with `sharded=False` the steps without a mesh."""
  from jaxlab.training import parallel
  from jaxlab.training.state import create_group_state, epoch_keys
  from jaxlab.training.steps import make_steps, train_epoch

  mesh = parallel.data_mesh() if sharded else None
  steps = make_steps(built, "stop", mesh)
  state = create_group_state(built, list(range(members)), [1e-3] * members,
                             parallel.replicated(mesh) if mesh else None)
  if mesh:
    parallel.check_batch_size(batch_size, mesh)
    x, y = parallel.put_replicated((images, labels), mesh)
  else:
    x, y = jax.device_put(images), jax.device_put(labels)
  epoch = 0

  def run() -> float:
    nonlocal state, epoch
    start = time.perf_counter()
    # train_epoch returns host floats of the epoch's metrics: the device has finished.
    state, _ = train_epoch(steps, state, x, y, batch_size,
                           epoch_keys(range(members), epoch),
                           steps_per_dispatch)
    epoch += 1
    return time.perf_counter() - start

  return run


def step_runner(built: Setup, images, labels, batch_size: int) -> EpochRunner:
  """jaxlab's compiled train step alone (`Steps.train_step`, donated), one call per batch on
  batches already on the device: the speed jaxlab's loop should keep (the guard against a loop
  that runs off its step, as convolutions inside a scan on XLA:CPU did)."""
  from jaxlab.training.state import create_train_state
  from jaxlab.training.steps import make_steps

  steps = make_steps(built)
  state = create_train_state(built, seed=0, learning_rate=1e-3)
  full = len(labels) // batch_size
  batches = [(jax.device_put(images[i * batch_size:(i + 1) * batch_size]),
              jax.device_put(labels[i * batch_size:(i + 1) * batch_size])) for i in range(full)]

  def run() -> float:
    nonlocal state
    start = time.perf_counter()
    for x, y in batches:
      state, metrics = steps.train_step(state, x, y)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - start) * len(labels) / (full * batch_size)

  return run


def _keras_model(built: Setup, seed: int | None = None) -> tuple[Any, Any]:
  """(keras, the Keras model of `built`'s plan compiled as the peers train it: Adam 1e-3,
  sparse categorical cross-entropy, accuracy), Keras seeded with `seed` first if given."""
  from jaxlab.keras.model import import_keras, to_keras

  keras = import_keras()
  if seed is not None:
    keras.utils.set_random_seed(seed)
  net = to_keras(built.model)
  net.compile(optimizer=keras.optimizers.Adam(learning_rate=1e-3),
              loss="sparse_categorical_crossentropy", metrics=["accuracy"])
  return keras, net


def keras_runner(built: Setup, images, labels, batch_size: int) -> EpochRunner:
  """Keras 3 `model.fit`, one epoch per call; a callback times the epoch itself (Keras keeps
  the compiled train function between calls)."""
  keras, net = _keras_model(built)
  x, y = _inputs(built, images), labels.astype(np.int32)

  class Timer(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
      self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
      self.seconds = time.perf_counter() - self.start

  timer = Timer()

  def run() -> float:
    net.fit(x, y, batch_size=batch_size, epochs=1, verbose=0, shuffle=True, callbacks=[timer])
    return timer.seconds

  return run


def keras_train(built: Setup, dataset, epochs: int, batch_size: int,
                seed: int) -> dict[str, list[float]]:
  """The peer of `scripts/train.py`: Keras 3 `fit` of the same architecture on a real data set
  (Adam 1e-3, validation on the test split every epoch), seeded with `seed`; its history."""
  _, net = _keras_model(built, seed)
  x, x_val = _inputs(built, dataset.train_images), _inputs(built, dataset.test_images)
  history = net.fit(x, dataset.train_labels.astype(np.int32), batch_size=batch_size,
                    epochs=epochs, verbose=0, shuffle=True,
                    validation_data=(x_val, dataset.test_labels.astype(np.int32)))
  return {k: [float(v) for v in vs] for k, vs in history.history.items()}


def _torch_layers():
  """Op kind -> its PyTorch module, from the op and the shapes (channels last) it reads and
  writes."""
  from torch import nn

  activations = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}
  activated = lambda module, op: nn.Sequential(
      module, *([activations[op.activation]()] if op.activation in activations else []))

  def conv(op, shape_in, shape_out):
    if op.padding == "same" and op.strides != 1:
      raise BadValue("the PyTorch peer supports 'same' padding at stride 1 only")
    return activated(nn.Conv2d(shape_in[-1], op.features, op.kernel_size, op.strides,
                               padding=op.padding), op)

  return {
      "dense": lambda op, shape_in, shape_out: activated(nn.Linear(shape_in[-1], op.features), op),
      "conv2d": conv,
      "batch_normalization": lambda op, shape_in, shape_out: (
          nn.BatchNorm1d if len(shape_out) == 1 else nn.BatchNorm2d)(shape_out[-1], eps=1e-3,
                                                                     momentum=0.01),
      "dropout": lambda op, shape_in, shape_out: nn.Dropout(op.rate),
      "max_pooling2d": lambda op, shape_in, shape_out: nn.MaxPool2d(op.kernel_size, op.strides),
      "flatten": lambda op, shape_in, shape_out: nn.Flatten(),
  }


def to_torch(built: Setup):
  """A PyTorch module of the plan (`jaxlab.models.walk` with a table of PyTorch layers; NCHW
  for convolutions), for timing only."""
  plan = plan_of(built.model, "the PyTorch peer")
  torch = import_torch()
  nn = torch.nn

  shapes, inputs = layer_output_shapes(built.model, built.example_shape), {}

  def shape_of(op, shape):  # Each op's input shape, from the walk over shapes.
    inputs[op.name] = shape
    return shapes[op.name]

  walk(plan, input_shape(built.model, built.example_shape), shape_of,
       lambda op, _: shapes[op.name])
  table = _torch_layers()

  class Net(nn.Module):
    def __init__(self):
      super().__init__()
      self.layers = nn.ModuleDict({op.name: table[op.kind](op, inputs[op.name], shapes[op.name])
                                   for op in iter_ops(plan) if not op.paths})

    def forward(self, x):
      return walk(plan, x, lambda op, x: self.layers[op.name](x),
                  lambda op, xs: torch.cat(xs, dim=1))

  return Net()


def import_torch():
  try:
    import torch
  except ImportError:
    raise MissingDependency("PyTorch is needed for the torch_eager peer; install it with "
                            "`pip install -e '.[bench]'`") from None
  return torch


def torch_runner(built: Setup, images, labels, batch_size: int) -> EpochRunner:
  """A plain PyTorch eager loop on the CPU."""
  torch = import_torch()

  torch.manual_seed(0)
  net = to_torch(built)
  optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-7)
  loss_fn = torch.nn.CrossEntropyLoss()
  x = torch.from_numpy(_inputs(built, images))
  if x.ndim == 4:
    x = x.permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW, PyTorch's layout.
  y = torch.from_numpy(labels.astype(np.int64))
  net.train()

  def run() -> float:
    start = time.perf_counter()
    order = torch.randperm(len(y))
    correct = 0
    for i in range(0, len(y), batch_size):
      idx = order[i:i + batch_size]
      optimizer.zero_grad(set_to_none=True)
      out = net(x[idx])
      loss = loss_fn(out, y[idx])
      loss.backward()
      optimizer.step()
      correct += (out.argmax(1) == y[idx]).sum().item()  # As Keras and jaxlab track accuracy.
    return time.perf_counter() - start

  return run


def machine() -> dict[str, Any]:
  return {"cpu": cpu()[0], "cpu_count": os.cpu_count(), "python": platform.python_version(),
          **environment()}


PEERS: dict[str, Callable[..., EpochRunner]] = {
    "keras_fit": keras_runner,
    "torch_eager": torch_runner,
    # jaxlab's steps without a mesh: what the data-parallel path costs, on one device nothing.
    "jaxlab_unsharded": lambda *args: jaxlab_runner(*args, sharded=False),
    # jaxlab's loop in bf16 (as this backend computes it: jaxlab.models.at_precision), beside the
    # float32 of the others, under the same process's kernels.
    "jaxlab_bf16": lambda built, *args, **kwargs: jaxlab_runner(
        dataclasses.replace(built, model=at_precision(built.model, "bf16")), *args, **kwargs),
    # The step alone, as profile_step.py times it: the loop's target.
    "jaxlab_step": step_runner,
}


def rotation(names: list[str], round_index: int) -> list[str]:
  """The loops' order in one round: rotated by the round's index, so over the rounds every
  loop runs in every position (none always follows the same neighbour)."""
  k = round_index % len(names) if names else 0
  return names[k:] + names[:k]


def _sequential(make: Callable[..., EpochRunner], members: int, *args) -> EpochRunner:
  """`members` independent models of a peer, trained one after another: an epoch of each."""
  runners = [make(*args) for _ in range(members)]
  return lambda: sum(run() for run in runners)


def run_benchmark(built: Setup, num_classes: int, batch_size: int, examples: int,
                  epochs: int, peers: list[str], peak_flops: float | None = None,
                  log: Callable[[str], None] = print, members: int = 1) -> dict[str, Any]:
  """Times jaxlab and each peer; returns the JSON-ready results with ratios and the floor.

  With `members` K > 1, jaxlab trains K seeds as one vmapped group, and each peer trains K
  models one after another; an "epoch" is then an epoch of all K."""
  from jaxlab.perf import profiling

  for name in peers:
    if name not in PEERS:
      raise BadValue(f"unknown peer {name!r}; known: {', '.join(PEERS)}")
  images, labels = random_data(built, examples, num_classes)
  makers = {"jaxlab": lambda *a: jaxlab_runner(*a, members=members),
            **{name: (lambda *a, make=PEERS[name]: _sequential(make, members, *a))
               for name in peers}}
  runners: dict[str, EpochRunner] = {}
  results: dict[str, Any] = {}
  for name, make in makers.items():
    log(f"setting up {name} and timing its warm-up epoch ({examples} examples)")
    try:
      runners[name] = make(built, images, labels, batch_size)
    except MissingDependency as e:  # The peer's package is not installed here.
      log(f"  skipped: {e}")
      results[name] = {"skipped": str(e)}
      continue
    results[name] = {"warmup_seconds": runners[name](), "epoch_seconds": []}
  from jaxlab.training.steps import choose_loop
  results["jaxlab"]["loop"] = choose_loop(built)
  peaks = []
  for i in range(epochs):
    order = rotation(list(runners), i)
    for name in order:
      results[name]["epoch_seconds"].append(runners[name]())
    if peak_flops is None:  # The peak of the precisions its dots and convolutions run in.
      peaks.append(profiling.model_peak_flops(built.model, built.example_shape, {
          p: profiling.matmul_peak_flops(p) for p in set(op_precisions(built.model).values())}))
    log(f"round {i + 1}/{epochs} ({', '.join(order)}): " + ", ".join(
        f"{name} {results[name]['epoch_seconds'][-1]:.3f} s" for name in runners))
  for name in runners:
    results[name]["median_epoch_seconds"] = statistics.median(results[name]["epoch_seconds"])
  if peak_flops is None:
    peak_flops = max(peaks)
  flops_per_epoch = 3 * forward_flops(built.model, built.example_shape) * examples * members
  floor = flops_per_epoch / peak_flops
  jaxlab_seconds = results["jaxlab"]["median_epoch_seconds"]
  ratios = {name: jaxlab_seconds / results[name]["median_epoch_seconds"]
            for name in runners if name != "jaxlab"}
  # Paired: jaxlab's epoch over the peer's epoch of the same round.
  round_ratios = {name: [a / b for a, b in zip(results["jaxlab"]["epoch_seconds"],
                                              results[name]["epoch_seconds"])]
                  for name in ratios}
  return {"machine": machine(), "batch_size": batch_size, "examples": examples,
          "members": members,
          "timed_epochs": epochs, "results": results, "ratios_jaxlab_over_peer": ratios,
          "round_ratios_jaxlab_over_peer": round_ratios,
          "flops_per_epoch": flops_per_epoch, "matmul_peak_flops_per_second": peak_flops,
          "matmul_peak_measurements": peaks,
          "flop_floor_seconds": floor, "jaxlab_fraction_of_floor": floor / jaxlab_seconds}


def markdown(result: dict[str, Any], title: str) -> str:
  m = result["machine"]
  lines = [f"## {title}", "",
           f"Machine: {m['cpu']}, {m['cpu_count']} CPU cores; JAX {m['jax']} on {m['backend']} "
           f"({m['device']}); Python {m['python']}.", "",
           f"Batch {result['batch_size']}, {result['examples']:,} random examples per epoch; "
           f"median of {result['timed_epochs']} epochs after one warm-up epoch, the loops' "
           "epochs interleaved in rounds.", ""]
  members = result.get("members", 1)
  if members > 1:
    lines += [f"{members} members: jaxlab trains them as one vmapped group, each peer trains "
              f"{members} models one after another. Seconds are per epoch of all {members}; "
              f"per member-epoch, divide by {members} (the ratios are the same).", ""]
  lines += ["| loop | seconds per epoch (median) | jaxlab / this (ratio of medians) "
            "| jaxlab / this, per round (median, min-max) |",
            "| --- | --- | --- | --- |"]
  for name, r in result["results"].items():
    if "median_epoch_seconds" not in r:
      lines.append(f"| {name} | skipped ({r['skipped']}) | | |")
      continue
    if name == "jaxlab":
      lines.append(f"| {name} | {r['median_epoch_seconds']:.3f} | 1 | |")
      continue
    rounds = result["round_ratios_jaxlab_over_peer"][name]
    lines.append(f"| {name} | {r['median_epoch_seconds']:.3f} | "
                 f"{result['ratios_jaxlab_over_peer'][name]:.2f} | "
                 f"{statistics.median(rounds):.2f} ({min(rounds):.2f}-{max(rounds):.2f}) |")
  step = result["results"].get("jaxlab_step", {})
  if "median_epoch_seconds" in step:
    lines += ["", f"The loop against its step alone (jaxlab / jaxlab_step): "
                  f"{result['ratios_jaxlab_over_peer']['jaxlab_step']:.2f} "
                  f"({result['results']['jaxlab'].get('loop', 'scan')} loop); above 1.10, the "
                  "loop runs off its step."]
  peaks = result["matmul_peak_measurements"]
  source = (f"the best of {len(peaks)} matmul peak measurements (one per round; lowest "
            f"{min(peaks) / 1e9:.1f})" if peaks else "a given matmul peak")
  lines += ["", f"FLOP floor: {result['flops_per_epoch'] / 1e9:.1f} GFLOP per epoch over "
                f"{source}, {result['matmul_peak_flops_per_second'] / 1e9:.1f} GFLOP/s = "
                f"{result['flop_floor_seconds']:.3f} s per epoch; jaxlab runs at "
                f"{result['jaxlab_fraction_of_floor']:.0%} of the floor's speed.", ""]
  return "\n".join(lines)
