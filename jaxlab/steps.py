"""The compiled steps: one train step, one eval step, and the scanned chunks that run them.

- The whole data set lives on the device as uint8; the compiled steps gather a batch by index
  and scale it to float32 in [0, 1] there. Each step's dropout key is `fold_in(rng, step)`.
- `train_chunk` runs `steps_per_dispatch` steps in one `lax.scan`, with the state donated.
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

from jaxlab.config import NAN_POLICIES
from jaxlab.models import PlanModel, l2_coefficients
from jaxlab.state import TrainState

Metrics = dict[str, jax.Array]


def to_inputs(images: jax.Array) -> jax.Array:
  """uint8 images -> float32 in [0, 1], on the device."""
  return images.astype(jnp.float32) / 255.0


def l2_penalty(params: Any, coefficients: dict[str, float]) -> jax.Array:
  """sum over regularized layers of c * sum(kernel ** 2): Keras's `kernel_regularizer=l2(c)`."""
  total = jnp.zeros((), jnp.float32)
  for name, c in coefficients.items():
    total = total + c * jnp.sum(jnp.square(params[name]["kernel"].astype(jnp.float32)))
  return total


def _sum_metrics(logits: jax.Array, labels: jax.Array) -> Metrics:
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return {"loss_sum": jnp.sum(loss),
          "correct": jnp.sum(jnp.argmax(logits, -1) == labels).astype(jnp.int32),
          "count": jnp.asarray(labels.shape[0], jnp.int32)}


NO_STEP = np.iinfo(np.int32).max  # `first_nonfinite` of a chunk whose steps were all finite.


def make_train_step(model: PlanModel, nan_policy: str = "stop") -> Callable[
    [TrainState, jax.Array, jax.Array], tuple[TrainState, Metrics]]:
  """One optimizer step on a batch of uint8 images and integer labels (not jitted).

  A step is non-finite when its loss or its gradient norm is NaN or infinite. Its metrics are
  left out of the sums and counted in `nonfinite`, with the step number in `first_nonfinite`;
  under `nan_policy="skip"` its update is dropped too (the step number still advances), under
  "stop" the caller stops the run (`jaxlab.hooks.NonFiniteGuard`)."""
  if nan_policy not in NAN_POLICIES:
    raise ValueError(f"unknown nan_policy {nan_policy!r}; known: {', '.join(NAN_POLICIES)}")
  coefficients = l2_coefficients(model)

  def train_step(state: TrainState, images: jax.Array, labels: jax.Array):
    labels = labels.astype(jnp.int32)
    dropout_key = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
      logits, updates = model.apply({"params": params, "batch_stats": state.batch_stats},
                                    to_inputs(images), train=True, rngs={"dropout": dropout_key},
                                    mutable=["batch_stats"])
      data_loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      reg = l2_penalty(params, coefficients)
      return data_loss + reg, (logits, reg, updates.get("batch_stats", {}))

    (loss, (logits, reg, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    finite = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))
    if nan_policy == "skip":
      kept = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old), new_state, state)
      new_state = kept.replace(step=new_state.step)
    metrics = _sum_metrics(logits, labels)
    metrics["l2_sum"] = reg * labels.shape[0]
    metrics = {k: jnp.where(finite, v, jnp.zeros_like(v)) for k, v in metrics.items()}
    metrics["nonfinite"] = (~finite).astype(jnp.int32)
    metrics["first_nonfinite"] = jnp.where(finite, NO_STEP, state.step).astype(jnp.int32)
    return new_state, metrics

  return train_step


def make_eval_step(model: PlanModel) -> Callable[[dict, jax.Array, jax.Array],
                                                 tuple[Metrics, jax.Array]]:
  """Eval-mode forward pass on a batch: metric sums and the predicted classes."""

  def eval_step(variables, images, labels):
    logits = model.apply(variables, to_inputs(images), train=False)
    return _sum_metrics(logits, labels.astype(jnp.int32)), jnp.argmax(logits, -1)

  return eval_step


def _add(a: Metrics, b: Metrics) -> Metrics:
  """Metric sums of two spans of steps: counts and sums add, the first bad step is the least."""
  return {k: (jnp.minimum if k == "first_nonfinite" else jnp.add)(a[k], b[k]) for k in a}


def train_sums_zeros() -> dict[str, float | int]:
  """The host-side sums of no train step (a Python number per metric)."""
  return {"loss_sum": 0.0, "l2_sum": 0.0, "correct": 0, "count": 0, "nonfinite": 0,
          "first_nonfinite": int(NO_STEP)}


@dataclasses.dataclass(frozen=True)
class Steps:
  """The compiled functions of one model: chunks of train steps, and batched evaluation."""

  train_step: Callable  # jitted, state donated: (state, images, labels) -> (state, metrics)
  eval_step: Callable  # jitted: (variables, images, labels) -> (metrics, predictions)
  train_chunk: Callable  # jitted: (state, images, labels, batches, start, length=) -> ...
  eval_batches: Callable  # jitted: (variables, images, labels, batches) -> (metrics, preds)


@functools.lru_cache(maxsize=64)
def make_steps(model: PlanModel, nan_policy: str = "stop") -> Steps:
  """The compiled steps of `model`, made once per model (per process), so that a second run of
  the same architecture reuses the compiled code instead of compiling it again."""
  train_step = make_train_step(model, nan_policy)
  eval_step = make_eval_step(model)

  @functools.partial(jax.jit, donate_argnums=0, static_argnames="length")
  def train_chunk(state, images, labels, batches, start, *, length):
    """`length` train steps: batch i takes the examples `batches[start + i]`."""
    chunk = jax.lax.dynamic_slice_in_dim(batches, start, length)

    def body(carry, idx):
      state, sums = carry
      state, metrics = train_step(state, images[idx], labels[idx])
      return (state, _add(sums, metrics)), None

    zeros = {k: jnp.asarray(v, jnp.float32 if isinstance(v, float) else jnp.int32)
             for k, v in train_sums_zeros().items()}
    (state, sums), _ = jax.lax.scan(body, (state, zeros), chunk)
    return state, sums

  @jax.jit
  def eval_batches(variables, images, labels, batches):
    def body(sums, idx):
      metrics, preds = eval_step(variables, images[idx], labels[idx])
      return _add(sums, metrics), preds

    zeros = {"loss_sum": jnp.zeros((), jnp.float32), "correct": jnp.zeros((), jnp.int32),
             "count": jnp.zeros((), jnp.int32)}
    return jax.lax.scan(body, zeros, batches)

  return Steps(jax.jit(train_step, donate_argnums=0), jax.jit(eval_step), train_chunk,
               eval_batches)


def split_batches(order: jax.Array, batch_size: int) -> list[jax.Array]:
  """The full batches as one (k, batch_size) array, then the smaller last batch if any."""
  n = order.shape[0]
  full = n // batch_size
  parts = []
  if full:
    parts.append(order[:full * batch_size].reshape(full, batch_size))
  if n % batch_size:
    parts.append(order[full * batch_size:][None])
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


def evaluate(steps: Steps, variables: dict, images: jax.Array, labels: jax.Array,
             batch_size: int) -> tuple[dict[str, float], np.ndarray]:
  """Loss, accuracy and per-example predictions over a whole split, in eval mode."""
  order = jnp.arange(images.shape[0])
  totals, preds = None, []
  for batches in split_batches(order, batch_size):
    sums, p = steps.eval_batches(variables, images, labels, batches)
    totals = sums if totals is None else _add(totals, sums)
    preds.append(p.reshape(-1))
  totals = jax.device_get(totals)
  count = int(totals["count"])
  return ({"loss": float(totals["loss_sum"]) / count, "accuracy": int(totals["correct"]) / count},
          np.asarray(jnp.concatenate(preds)))


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
                batch_size: int, shuffle_key: jax.Array, steps_per_dispatch: int,
                on_chunk: Callable[[int, dict[str, Any]], None] | None = None,
                first_step: int = 0, start: int = 0, totals: dict[str, Any] | None = None,
                wants_state: Callable[[int], bool] | None = None,
                on_state: Callable[[TrainState, dict[str, Any]], None] | None = None,
                ) -> tuple[TrainState, dict[str, Any]]:
  """One pass over the training split in the order `permutation(shuffle_key)`.

  `on_chunk(steps, totals)` is called as each compiled call's metric sums reach the host, with
  the number of steps it ran and the epoch's running sums. `first_step` is the global number of
  the epoch's first step (for profiler traces and `wants_state`).

  Resuming inside an epoch: `start` steps of it are done already, with the sums `totals`
  (`start` must be a chunk boundary, as every saved position is). At each chunk boundary but
  the epoch's last, `wants_state(global_step)` may ask for the state: the queue is drained and
  `on_state(state, totals)` sees the state and the sums of exactly the steps so far (a
  checkpoint, a preemption). Otherwise the host reads a chunk's sums only after it has queued
  the next chunk, so reading them never stalls the device.
  """
  order = jax.random.permutation(shuffle_key, images.shape[0])
  parts = split_batches(order, batch_size)
  chunks = epoch_chunks(images.shape[0], batch_size, steps_per_dispatch)
  boundaries = list(np.cumsum([0] + [length for _, _, length in chunks]))
  if start not in boundaries[:-1]:
    raise ValueError(f"step {start} of the epoch is not a chunk boundary ({boundaries[:6]}...): "
                     "a position saved with other --steps_per_dispatch or --batch_size")
  pending: list[tuple[int, Metrics]] = []
  totals = dict(totals or train_sums_zeros())

  def drain(keep: int) -> None:
    # Read back all but the newest `keep` chunks: those are still queued on the device.
    while len(pending) > keep:
      n, sums = pending.pop(0)
      for k, v in jax.device_get(sums).items():
        totals[k] = min(totals[k], v.item()) if k == "first_nonfinite" else totals[k] + v.item()
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
  return state, epoch_metrics(totals)


def epoch_metrics(totals: dict[str, Any]) -> dict[str, Any]:
  """The epoch's means from its sums (None where every step was skipped)."""
  count = totals["count"]
  mean = (lambda x: x / count) if count else (lambda x: None)
  return {"loss": mean(totals["loss_sum"] + totals["l2_sum"]),
          "data_loss": mean(totals["loss_sum"]), "l2_loss": mean(totals["l2_sum"]),
          "accuracy": mean(totals["correct"]), "skipped_steps": totals["nonfinite"]}
