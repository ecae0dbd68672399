"""The compiled steps: one train step, one eval step, and the chunks of steps that run them.

- The whole data set lives on the device as uint8; the compiled steps gather a batch by index
  and scale it to float32 in [0, 1] there. Each step's dropout key is `fold_in(rng, step)`.
- `train_chunk` runs `steps_per_dispatch` steps, in one `lax.scan` or (on XLA:CPU, for
  convolutions) one dispatch of the step each, with the state donated (`Steps.loop`).
  Metric sums stay on the device; the host reads a chunk's sums only after it has queued the
  next chunk, so reading them never stalls the device.
- Keras keeps the last, smaller batch of an epoch; so does jaxlab (one more compiled shape).
- `train_step` is the one definition of what a step computes; everything else wraps it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax.sharding import Mesh

from jaxlab import metrics as metrics_lib
from jaxlab.training import parallel
from jaxlab.config import NAN_POLICIES, check_choice
from jaxlab.metrics import FIRST_NONFINITE, NO_STEP, NONFINITE
from jaxlab.models import convolves, regularizer
from jaxlab.caches import cached
from jaxlab.training.state import RUN_ONCE, Setup, TrainState

Metrics = dict[str, jax.Array]


def to_inputs(images: jax.Array) -> jax.Array:
  """uint8 images -> float32 in [0, 1], on the device."""
  return images.astype(jnp.float32) / 255.0


def all_finite(tree: Any) -> jax.Array:
  """Whether every element of every array of `tree` is finite (one boolean)."""
  leaves = jax.tree_util.tree_leaves(tree)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def make_train_step(setup: Setup, nan_policy: str = "stop") -> Callable[
    [TrainState, jax.Array, jax.Array], tuple[TrainState, Metrics]]:
  """One optimizer step on a batch of uint8 images and integer labels (not jitted): the mean
  cross-entropy plus the model's own regularization (`jaxlab.models.regularizer`), minimized
  by the setup's optimizer; the metric sums of the batch (`jaxlab.metrics.sums`).

  A step is non-finite when its loss, its gradient, or the parameters or BatchNorm statistics
  it produces hold a NaN or an infinity (a moving variance can overflow while the loss is still
  finite, and would poison every later evaluation). Its metrics are left out of the sums and
  counted in `nonfinite`, with the step number in `first_nonfinite`; under
  `nan_policy="skip"` its update is dropped too (the step number still advances), under
  "stop" the caller stops the run (`jaxlab.training.runfiles.RunFiles.check_finite`)."""
  check_choice("nan_policy", nan_policy, NAN_POLICIES)
  model, tx = setup.model, setup.optimizer
  regularization = regularizer(model) or (lambda params: jnp.zeros((), jnp.float32))

  def train_step(state: TrainState, images: jax.Array, labels: jax.Array):
    labels = labels.astype(jnp.int32)
    dropout_key = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
      logits, updates = model.apply({"params": params, "batch_stats": state.batch_stats},
                                    to_inputs(images), train=True, rngs={"dropout": dropout_key},
                                    mutable=["batch_stats"])
      data_loss = metrics_lib.cross_entropy(logits, labels).mean()
      reg = jnp.asarray(regularization(params), jnp.float32)
      return data_loss + reg, (logits, reg, updates.get("batch_stats", {}))

    (loss, (logits, reg, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params,
                                                                              updates),
                              opt_state=opt_state, batch_stats=batch_stats)
    finite = jnp.isfinite(loss) & all_finite((grads, new_state.params, new_state.batch_stats))
    if nan_policy == "skip":
      kept = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old), new_state, state)
      new_state = kept.replace(step=new_state.step)
    metrics = metrics_lib.sums(setup.metrics, logits, labels)
    metrics[metrics_lib.L2] = reg * labels.shape[0]
    metrics = {k: jnp.where(finite, v, jnp.zeros_like(v)) for k, v in metrics.items()}
    metrics[NONFINITE] = (~finite).astype(jnp.int32)
    metrics[FIRST_NONFINITE] = jnp.where(finite, NO_STEP, state.step).astype(jnp.int32)
    return new_state, metrics

  return train_step


def make_eval_step(setup: Setup) -> Callable[[dict, jax.Array, jax.Array],
                                             tuple[Metrics, jax.Array]]:
  """Eval-mode forward pass on a batch: metric sums and the predicted classes."""
  model = setup.model

  def eval_step(variables, images, labels):
    logits = model.apply(variables, to_inputs(images), train=False)
    labels = labels.astype(jnp.int32)
    return metrics_lib.sums(setup.metrics, logits, labels), jnp.argmax(logits, -1)

  return eval_step


LOOPS = ("auto", "scan", "steps")


@dataclasses.dataclass(frozen=True)
class Steps:
  """The compiled functions of one model. The chunks and the evaluation run a group of K
  members (a stacked state, `jaxlab.training.state.create_group_state`) as one vmapped program; a single
  run is a group of one. All wrap the one `train_step` and `eval_step`.

  `loop` says how a chunk runs: "scan", one compiled `lax.scan` over its steps (one dispatch a
  chunk); "steps", one dispatch of the compiled (vmapped) step per train step, the metric sums
  still added on the device, for XLA:CPU, whose convolutions inside a while loop (every
  `lax.scan`) leave its fast kernels and run many times slower. Both give a chunk the same
  meaning: the same positions to resume from, the same lagged metric reads."""

  train_step: Callable  # jitted, one state, donated: (state, images, labels) -> (state, metrics)
  eval_step: Callable  # jitted, one state: (variables, images, labels) -> (metrics, predictions)
  train_chunk: Callable  # K members, donated: (state, images, labels, batches, start, length=)
  eval_batches: Callable  # K members: (variables, images, labels, batches, interrupt=) ->
  #                        (sums, preds)
  group_train_step: Callable  # jitted, K members, donated: one batch each (K, B, ...)
  group_eval_step: Callable  # jitted, K members: the same batch for every member
  loop: str = "scan"
  metrics: metrics_lib.Table = ()  # What the sums are of (`jaxlab.metrics`).

  @property
  def train_zeros(self) -> dict[str, float | int]:
    """The sums of no train step, on the host (an epoch's running sums start here)."""
    return metrics_lib.train_zeros(self.metrics)


def over_members(fn: Callable) -> Callable:
  """`jax.vmap(fn)` over the leading member axis of every argument; for a group of one (every
  single run), `fn` on the member itself: a vmap over one member still batches each convolution
  and matmul, with layout copies around it (AlexNet's step on XLA:CPU: 11% slower)."""

  def wrapped(*args):
    if jax.tree_util.tree_leaves(args[0])[0].shape[0] != 1:
      return jax.vmap(fn)(*args)
    out = fn(*jax.tree_util.tree_map(lambda x: x[0], args))
    return jax.tree_util.tree_map(lambda x: x[None], out)

  return wrapped


def _zeros(sums: dict[str, float | int], members: int | None = None) -> Metrics:
  """`sums` (the sums of no step: zeros, and NO_STEP for the first bad step) as arrays:
  scalars, or one per member."""
  shape = () if members is None else (members,)
  return {k: jnp.full(shape, v, jnp.float32 if isinstance(v, float) else jnp.int32)
          for k, v in sums.items()}


def choose_loop(setup: Setup, loop: str | None = None, backend: str | None = None) -> str:
  """The loop `make_steps` builds: `loop` (the scripts' --loop; default "auto") unless "auto";
  "auto" is "steps" for a model with convolutions on the CPU (measured: AlexNet's step 0.26 s
  alone, 4.7 s inside a scan of one step, on XLA:CPU) and "scan" otherwise (a scan of an MLP's
  steps saves the dispatches)."""
  loop = loop or "auto"
  if loop not in LOOPS:
    raise ValueError(f"unknown loop {loop!r}; known: {', '.join(LOOPS)}")
  if loop != "auto":
    return loop
  backend = backend or jax.default_backend()
  return "steps" if backend == "cpu" and _convolves(setup.model, setup.example_shape) else "scan"


@cached
def _convolves(model: Any, example_shape: tuple[int, ...]) -> bool:
  return convolves(model, example_shape)


def make_steps(setup: Setup, nan_policy: str = "stop", mesh: Mesh | None = None,
               loop: str | None = None) -> Steps:
  """The compiled steps of `setup`, made once per setup (per process, `jaxlab.training.state.cached`),
  so that a second run of the same architecture reuses the compiled code instead of compiling
  it again.

  With a `mesh`, the chunks and evaluation are data parallel (`jaxlab.training.parallel`): each batch
  gathered from the replicated data set is split across the mesh, the state stays replicated,
  and XLA adds the all-reduces. The step itself is the same `train_step`. `loop`: see `Steps`
  and `choose_loop`."""
  return _make_steps(setup, nan_policy, mesh, choose_loop(setup, loop))


@cached
def _make_steps(setup: Setup, nan_policy: str, mesh: Mesh | None, loop: str) -> Steps:
  train_step = make_train_step(setup, nan_policy)
  eval_step = make_eval_step(setup)
  train_zeros, eval_zeros = (metrics_lib.train_zeros(setup.metrics),
                             metrics_lib.eval_zeros(setup.metrics))

  def step_on(images, labels):
    """One member's step on the examples `idx`, its metrics added to the running sums."""
    def step(carry, idx):
      state, sums = carry
      state, metrics = train_step(state, parallel.shard_batch(images[idx], mesh),
                                  parallel.shard_batch(labels[idx], mesh))
      return state, metrics_lib.add(sums, metrics)
    return step

  def eval_on(variables, images, labels):
    def step(sums, idx):
      metrics, preds = eval_step(variables, parallel.shard_batch(images[idx], mesh),
                                 parallel.shard_batch(labels[idx], mesh))
      return metrics_lib.add(sums, metrics), preds
    return step

  @functools.partial(jax.jit, donate_argnums=0, static_argnames="length")
  def scan_chunk(state, images, labels, batches, start, *, length):
    """`length` train steps of every member: member k's step i takes the examples
    `batches[k, start + i]` (each member has its own order)."""

    def member(state, batches):
      step = step_on(images, labels)
      chunk = jax.lax.dynamic_slice_in_dim(batches, start, length)
      return jax.lax.scan(lambda carry, idx: (step(carry, idx), None),
                          (state, _zeros(train_zeros)), chunk)[0]

    return parallel.replicate(over_members(member)(state, batches), mesh)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def one_step(state, sums, images, labels, batches, index):
    """Train step `index` of every member, added to its sums."""
    step = step_on(images, labels)
    return parallel.replicate(
        over_members(lambda s, t, b: step((s, t), b[index]))(state, sums, batches), mesh)

  def step_chunk(state, images, labels, batches, start, *, length):
    sums = _zeros(train_zeros, batches.shape[0])
    for i in range(length):
      state, sums = one_step(state, sums, images, labels, batches, start + i)
    return state, sums

  @jax.jit
  def scan_eval_batches(variables, images, labels, batches):
    """Every member's metric sums and predictions over the same batches."""
    member = lambda v: jax.lax.scan(eval_on(v, images, labels), _zeros(eval_zeros), batches)
    return parallel.replicate(over_members(member)(variables), mesh)

  def scan_eval(variables, images, labels, batches, interrupt=None):
    return scan_eval_batches(variables, images, labels, batches)

  @jax.jit
  def one_eval(variables, sums, images, labels, batches, index):
    step = lambda v, t: eval_on(v, images, labels)(t, batches[index])
    return parallel.replicate(over_members(step)(variables, sums), mesh)

  def step_eval(variables, images, labels, batches, interrupt=None):
    sums = _zeros(eval_zeros, jax.tree_util.tree_leaves(variables)[0].shape[0])
    preds = []
    for i in range(batches.shape[0]):
      if interrupt and preds:  # The batch before done, the stop is asked for between batches.
        jax.block_until_ready(preds[-1])
        interrupt()
      sums, p = one_eval(variables, sums, images, labels, batches, i)
      preds.append(p)
    return sums, jnp.stack(preds, axis=1)

  chunk, evaluation = (scan_chunk, scan_eval) if loop == "scan" else (step_chunk, step_eval)
  return Steps(jax.jit(train_step, donate_argnums=0), jax.jit(eval_step), chunk, evaluation,
               jax.jit(jax.vmap(train_step), donate_argnums=0),
               jax.jit(jax.vmap(eval_step, in_axes=(0, None, None))), loop, setup.metrics)


def split_batches(order: jax.Array, batch_size: int) -> list[jax.Array]:
  """The full batches as one (..., k, batch_size) array, then the smaller last batch if any
  (leading axes, one per member, are kept)."""
  n = order.shape[-1]
  lead = order.shape[:-1]
  full = n // batch_size
  parts = []
  if full:
    parts.append(order[..., :full * batch_size].reshape(lead + (full, batch_size)))
  if n % batch_size:
    parts.append(order[..., full * batch_size:][..., None, :])
  return parts


def chunk_lengths(num_steps: int, max_length: int) -> list[tuple[int, int]]:
  """(start, length) of the compiled calls that cover `num_steps` steps.

  Each distinct length is one compilation, so a length that divides `num_steps` is preferred
  (any divisor down to half of `max_length`); otherwise the last call is shorter.
  """
  length = min(max_length, num_steps)
  for candidate in range(length, (length + 1) // 2 - 1, -1):
    if num_steps % candidate == 0:
      length = candidate
      break
  return [(start, min(length, num_steps - start)) for start in range(0, num_steps, length)]


def evaluate_group(steps: Steps, variables: dict, images: jax.Array, labels: jax.Array,
                   batch_size: int, interrupt: Callable[[], None] | None = None
                   ) -> tuple[list[dict[str, float]], np.ndarray]:
  """Each member's metrics (`loss`, `accuracy` and the setup's own) over a whole split in eval
  mode, and its predictions (K, N); `variables` are stacked along a leading member axis.
  `interrupt()`, called before each compiled call (and between the batches of the "steps"
  loop, each waited for), may raise to stop the evaluation there."""
  order = jnp.arange(images.shape[0])
  totals, preds = None, []
  for batches in split_batches(order, batch_size):
    if interrupt:
      interrupt()
    sums, p = steps.eval_batches(variables, images, labels, batches, interrupt=interrupt)
    totals = sums if totals is None else metrics_lib.add(totals, sums)
    preds.append(p.reshape(p.shape[0], -1))
  totals = jax.device_get(totals)
  order = [*metrics_lib.names(steps.metrics), metrics_lib.COUNT]  # The table's, not sorted.
  members = [metrics_lib.means({key: totals[key][k].item() for key in order})
             for k in range(len(totals[metrics_lib.COUNT]))]
  return members, np.asarray(jnp.concatenate(preds, axis=1))


def evaluate(steps: Steps, variables: dict, images: jax.Array, labels: jax.Array,
             batch_size: int) -> tuple[dict[str, float], np.ndarray]:
  """The metrics and per-example predictions of one model's variables over a whole split."""
  members, preds = evaluate_group(steps, _one_member(variables), images, labels, batch_size)
  return members[0], preds[0]


@jax.jit
def _one_member(variables: dict) -> dict:
  """`variables` as a group of one: a leading member axis on every array (one compiled call,
  not one dispatch per array)."""
  return jax.tree_util.tree_map(lambda x: jnp.asarray(x)[None], variables)


@functools.partial(jax.jit, static_argnums=1, compiler_options=RUN_ONCE)
def epoch_orders(shuffle_keys: jax.Array, num_examples: int) -> jax.Array:
  """Each member's order of the examples in an epoch: `permutation(shuffle_keys[k])`."""
  return jax.vmap(lambda key: jax.random.permutation(key, num_examples))(shuffle_keys)


def epoch_chunks(num_examples: int, batch_size: int,
                 steps_per_dispatch: int) -> list[tuple[int, int, int]]:
  """(part, start, length) of every compiled call of an epoch, in order: `part` 0 is the full
  batches, 1 the smaller last batch. A chunk's first step in the epoch is the sum of the
  lengths before it; those sums are the only places an epoch can be resumed from."""
  full, rest = divmod(num_examples, batch_size)
  chunks = [(0, start, length)
            for start, length in (chunk_lengths(full, steps_per_dispatch) if full else [])]
  return chunks + [(1 if full else 0, 0, 1)] * bool(rest)


def train_epoch(steps: Steps, state: TrainState, images: jax.Array, labels: jax.Array,
                batch_size: int, shuffle_keys: jax.Array, steps_per_dispatch: int,
                on_chunk: Callable[[int, list[dict[str, Any]]], None] | None = None,
                first_step: int = 0, start: int = 0,
                totals: list[dict[str, Any]] | None = None,
                wants_state: Callable[[int], bool] | None = None,
                on_state: Callable[[TrainState, list[dict[str, Any]]], None] | None = None,
                on_end: Callable[[TrainState, list[dict[str, Any]]], None] | None = None,
                ) -> tuple[TrainState, list[dict[str, Any]]]:
  """One pass of every member over the training split, member k in the order
  `permutation(shuffle_keys[k])` (the order a single run with that key takes).

  `state` holds K members stacked; the sums and metrics are one dict per member.
  `on_chunk(steps, totals)` is called as each compiled call's metric sums reach the host, with
  the number of steps it ran and the epoch's running sums. `first_step` is the global number of
  the epoch's first step (for profiler traces and `wants_state`).

  Resuming inside an epoch: `start` steps of it are done already, with the sums `totals`
  (`start` must be a chunk boundary, as every saved position is; the epoch's last one too, for a
  run stopped in the epoch's validation). At each chunk boundary but the epoch's last,
  `wants_state(global_step)` may ask for the state: the queue is drained and
  `on_state(state, totals)` sees the state and the sums of exactly the steps so far (a
  checkpoint, a preemption). Otherwise the host reads a chunk's sums only after it has queued
  the next chunk, so reading them never stalls the device. At the end, `on_end(state, totals)`
  sees the state and the whole epoch's sums.
  """
  members = len(shuffle_keys)
  orders = epoch_orders(shuffle_keys, images.shape[0])
  parts = split_batches(orders, batch_size)
  chunks = epoch_chunks(images.shape[0], batch_size, steps_per_dispatch)
  boundaries = list(np.cumsum([0] + [length for _, _, length in chunks]))
  if start not in boundaries:
    raise ValueError(f"step {start} of the epoch is not a chunk boundary ({boundaries[:6]}...): "
                     "a position saved with other --steps_per_dispatch or --batch_size")
  pending: list[tuple[int, Metrics]] = []
  totals = [dict(t) for t in totals] if totals else [dict(steps.train_zeros) for _ in range(members)]

  def drain(keep: int) -> None:
    # Read back all but the newest `keep` chunks: those are still queued on the device.
    while len(pending) > keep:
      n, sums = pending.pop(0)
      sums = jax.device_get(sums)
      for k, member_totals in enumerate(totals):
        member_totals.update(metrics_lib.add(
            member_totals, {key: values[k].item() for key, values in sums.items()}, min))
      if on_chunk:
        on_chunk(n, totals)

  for (part, chunk_start, length), done in zip(chunks, boundaries[1:]):
    if done <= start:
      continue
    with jax.profiler.StepTraceAnnotation("train", step_num=first_step + done - length):
      state, sums = steps.train_chunk(state, images, labels, parts[part], chunk_start,
                                      length=length)
    pending.append((length, sums))
    if done < boundaries[-1] and wants_state and wants_state(first_step + done):
      drain(keep=0)
      if on_state:
        on_state(state, totals)
    else:
      drain(keep=1)
  drain(keep=0)
  if on_end:
    on_end(state, totals)
  return state, [metrics_lib.epoch_means(t) for t in totals]
