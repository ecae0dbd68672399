"""The train state, the compiled train and eval steps, and the epoch loop with resumption.

Design:
- One `TrainState` pytree holds params, BatchNorm statistics, optimizer state, step and the
  dropout RNG; checkpoints are that pytree in msgpack.
- The whole data set lives on the device as uint8; the compiled steps gather a batch by index
  and scale it to float32 in [0, 1] there. Each epoch's order is a permutation drawn from
  (seed, epoch), and each step's dropout key is `fold_in(rng, step)`, so a resumed run
  repeats exactly what an uninterrupted one would have done.
- `train_chunk` runs `steps_per_dispatch` steps in one `lax.scan`, with the state donated.
  Metric sums stay on the device; the host reads a chunk's sums only after it has queued the
  next chunk, so the progress bar never stalls the device.
- Keras keeps the last, smaller batch of an epoch; so does jaxlab (one more compiled shape).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
import statistics
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax.training import train_state

import jaxlab
from jaxlab import checkpoint
from jaxlab.config import RESUMABLE_CHANGES, TrainConfig, build_model
from jaxlab.data import Dataset, load_dataset
from jaxlab.metrics import append_jsonl, read_jsonl, write_json, write_jsonl
from jaxlab.models import PlanModel, describe, l2_coefficients
from jaxlab.rundir import RunDir
from jaxlab import evaluation
from jaxlab.optim import make_optimizer
from jaxlab.summary import summarize

Metrics = dict[str, jax.Array]


class TrainState(train_state.TrainState):
  """Params, optimizer state and step (from Flax), plus BatchNorm statistics and the RNG."""

  batch_stats: Any = None
  rng: jax.Array | None = None  # Dropout key; each step folds in its step number.

  @property
  def variables(self) -> dict[str, Any]:
    return {"params": self.params, "batch_stats": self.batch_stats}


def seed_keys(seed: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(init, dropout, shuffle) keys: three independent streams from one seed."""
  init, dropout, shuffle = jax.random.split(jax.random.PRNGKey(seed), 3)
  return init, dropout, shuffle


@functools.lru_cache(maxsize=64)
def _jitted_init(model: PlanModel) -> Callable:
  return jax.jit(model.init)


def create_train_state(model: PlanModel, tx: optax.GradientTransformation,
                       seed: int) -> TrainState:
  init_key, dropout_key, _ = seed_keys(seed)
  x = jnp.zeros((1,) + model.input_shape(), jnp.float32)
  variables = _jitted_init(model)(init_key, x)
  state = TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                            batch_stats=variables.get("batch_stats", {}), rng=dropout_key)
  # A typed step (not Python's weakly typed 0) matches what a checkpoint restores, so a resumed
  # run reuses the programs a fresh one compiled.
  return state.replace(step=jnp.zeros((), jnp.int32))


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


def make_train_step(model: PlanModel) -> Callable[[TrainState, jax.Array, jax.Array],
                                                  tuple[TrainState, Metrics]]:
  """One optimizer step on a batch of uint8 images and integer labels (not jitted)."""
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

    (_, (logits, reg, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    metrics = _sum_metrics(logits, labels)
    metrics["l2_sum"] = reg * labels.shape[0]
    return state, metrics

  return train_step


def make_eval_step(model: PlanModel) -> Callable[[dict, jax.Array, jax.Array],
                                                 tuple[Metrics, jax.Array]]:
  """Eval-mode forward pass on a batch: metric sums and the predicted classes."""

  def eval_step(variables, images, labels):
    logits = model.apply(variables, to_inputs(images), train=False)
    return _sum_metrics(logits, labels.astype(jnp.int32)), jnp.argmax(logits, -1)

  return eval_step


def _add(a: Metrics, b: Metrics) -> Metrics:
  return jax.tree_util.tree_map(jnp.add, a, b)


@dataclasses.dataclass(frozen=True)
class Steps:
  """The compiled functions of one model: chunks of train steps, and batched evaluation."""

  train_step: Callable  # jitted, state donated: (state, images, labels) -> (state, metrics)
  eval_step: Callable  # jitted: (variables, images, labels) -> (metrics, predictions)
  train_chunk: Callable  # jitted: (state, images, labels, batches, start, length=) -> ...
  eval_batches: Callable  # jitted: (variables, images, labels, batches) -> (metrics, preds)


@functools.lru_cache(maxsize=64)
def make_steps(model: PlanModel) -> Steps:
  """The compiled steps of `model`, made once per model (per process), so that a second run of
  the same architecture reuses the compiled code instead of compiling it again."""
  train_step = make_train_step(model)
  eval_step = make_eval_step(model)

  @functools.partial(jax.jit, donate_argnums=0, static_argnames="length")
  def train_chunk(state, images, labels, batches, start, *, length):
    """`length` train steps: batch i takes the examples `batches[start + i]`."""
    chunk = jax.lax.dynamic_slice_in_dim(batches, start, length)

    def body(carry, idx):
      state, sums = carry
      state, metrics = train_step(state, images[idx], labels[idx])
      return (state, _add(sums, metrics)), None

    zeros = {"loss_sum": jnp.zeros((), jnp.float32), "l2_sum": jnp.zeros((), jnp.float32),
             "correct": jnp.zeros((), jnp.int32), "count": jnp.zeros((), jnp.int32)}
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


class Progress:
  """A per-epoch progress bar (tqdm) showing running loss and accuracy."""

  def __init__(self, epoch: int, epochs: int, total_steps: int, enabled: bool):
    self._bar = None
    if enabled:
      from tqdm import tqdm
      self._bar = tqdm(total=total_steps, desc=f"epoch {epoch}/{epochs}", unit="step",
                       file=sys.stderr, dynamic_ncols=True, leave=True)

  def update(self, steps: int, totals: dict[str, float]) -> None:
    if self._bar is not None:
      n = max(totals["count"], 1)
      self._bar.set_postfix(loss=f"{totals['loss_sum'] / n:.4f}",
                            accuracy=f"{totals['correct'] / n:.4f}", refresh=False)
      self._bar.update(steps)

  def close(self, summary: str) -> None:
    if self._bar is not None:
      self._bar.set_postfix_str(summary, refresh=False)
      self._bar.close()


def train_epoch(steps: Steps, state: TrainState, images: jax.Array, labels: jax.Array,
                batch_size: int, shuffle_key: jax.Array, steps_per_dispatch: int,
                progress: Progress | None = None,
                first_step: int = 0) -> tuple[TrainState, dict[str, float]]:
  """One pass over the training split in the order `permutation(shuffle_key)`.

  `first_step` numbers the steps in profiler traces (`StepTraceAnnotation`).
  """
  order = jax.random.permutation(shuffle_key, images.shape[0])
  pending: list[tuple[int, Metrics]] = []
  totals = {"loss_sum": 0.0, "l2_sum": 0.0, "correct": 0, "count": 0}

  def drain(keep: int) -> None:
    # Read back all but the newest `keep` chunks: those are still queued on the device.
    while len(pending) > keep:
      n, sums = pending.pop(0)
      for k, v in jax.device_get(sums).items():
        totals[k] += v.item()
      if progress:
        progress.update(n, totals)

  step = first_step
  for batches in split_batches(order, batch_size):
    for start, length in chunk_lengths(batches.shape[0], steps_per_dispatch):
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        state, sums = steps.train_chunk(state, images, labels, batches, start, length=length)
      step += length
      pending.append((length, sums))
      drain(keep=1)
  drain(keep=0)
  count = totals["count"]
  return state, {"loss": (totals["loss_sum"] + totals["l2_sum"]) / count,
                 "data_loss": totals["loss_sum"] / count,
                 "l2_loss": totals["l2_sum"] / count,
                 "accuracy": totals["correct"] / count}


# ----------------------------------------------------------------------------- the run


def environment() -> dict[str, Any]:
  """jaxlab and JAX versions, and the backend and device the computation runs on."""
  device = jax.devices()[0]
  return {"jaxlab": jaxlab.__version__, "jax": jax.__version__, "backend": jax.default_backend(),
          "device": getattr(device, "device_kind", str(device)), "device_count": jax.device_count()}


def _check_resume(run: RunDir, config: TrainConfig) -> None:
  old = run.read_config().to_json()
  new = config.to_json()
  changed = [k for k in new if k not in RESUMABLE_CHANGES and old.get(k) != new[k]]
  if changed:
    diffs = ", ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in changed)
    raise ValueError(f"{run.root} holds a run with a different configuration ({diffs}); "
                     "use another --workdir, or the same settings to resume it")


EpochCallback = Callable[[int, dict[str, Any], TrainState], None]


def train_and_evaluate(config: TrainConfig, workdir: str | pathlib.Path,
                       dataset: Dataset | None = None, progress: bool | None = None,
                       callbacks: Sequence[EpochCallback] = ()) -> dict[str, Any]:
  """Trains `config` into `workdir`, resuming from its last checkpoint, and returns the summary.

  `callbacks` are called after every epoch (after its checkpoint is written) with the epoch
  number, its metrics record and the train state.
  """
  run = RunDir(workdir)
  run.root.mkdir(parents=True, exist_ok=True)
  if run.config.exists():
    _check_resume(run, config)
  if dataset is None:
    dataset = load_dataset(config.dataset, data_dir=config.data_dir, download=config.download)
  elif dataset.info.name != config.dataset:
    raise ValueError(f"dataset {dataset.info.name!r} given for a config of {config.dataset!r}")
  dataset = dataset.limit_train(config.train_limit)

  model = build_model(config.experiment, dataset.info, config.precision)
  summary = summarize(model)
  write_json(run.config, {"config": config.to_json(), "model": describe(model),
                          "data": {"source": dataset.source,
                                   "train_examples": int(len(dataset.train_labels)),
                                   "validation_examples": int(len(dataset.test_labels))},
                          "environment": environment()})

  tx = make_optimizer(config.optimizer, config.learning_rate)
  state = create_train_state(model, tx, config.seed)
  history = read_jsonl(run.metrics_jsonl)
  start_epoch = 0
  if run.last.exists():
    restored = checkpoint.restore(run.last, {"epoch": 0, "state": state})
    state, start_epoch = restored["state"], int(restored["epoch"])
    logging.info("Resuming %s from epoch %d (%s)", run.root, start_epoch, run.last)
  # Epochs after the checkpoint (a crash between the metrics line and the checkpoint) rerun.
  history = [r for r in history if r["epoch"] <= start_epoch]
  write_jsonl(run.metrics_jsonl, history)

  steps = make_steps(model)
  train_images, train_labels = jax.device_put(dataset.train_images), jax.device_put(
      dataset.train_labels)
  test_images, test_labels = jax.device_put(dataset.test_images), jax.device_put(
      dataset.test_labels)
  _, _, shuffle_key = seed_keys(config.seed)
  steps_per_epoch = math.ceil(len(dataset.train_labels) / config.batch_size)
  show = sys.stderr.isatty() if progress is None else progress
  best = max((r["val_accuracy"] for r in history), default=-1.0)

  def write_summary(status: str, evaluations: dict[str, Any] | None = None) -> dict[str, Any]:
    final = history[-1] if history else {}
    best_record = max(history, key=lambda r: r["val_accuracy"]) if history else {}
    out = {
        "experiment": config.experiment, "dataset": config.dataset, "status": status,
        "epochs_completed": len(history), "epochs": config.epochs,
        "final_val_accuracy": final.get("val_accuracy"), "final_val_loss": final.get("val_loss"),
        "best_val_accuracy": best_record.get("val_accuracy"),
        "best_epoch": best_record.get("epoch"),
        "total_params": summary["total_params"], "trainable_params": summary["trainable_params"],
        "non_trainable_params": summary["non_trainable_params"],
        "total_seconds": sum(r["epoch_seconds"] + r["eval_seconds"] for r in history),
        "median_epoch_seconds": (statistics.median(r["epoch_seconds"] for r in history)
                                 if history else None),
        "checkpoints": {"last": str(run.last.relative_to(run.root)),
                        "best": str(run.best.relative_to(run.root))},
    }
    if evaluations:
      out["evaluation"] = evaluations
    write_json(run.metrics_json, out)
    return out

  for epoch in range(start_epoch + 1, config.epochs + 1):
    bar = Progress(epoch, config.epochs, steps_per_epoch, show)
    t0 = time.perf_counter()
    state, train_metrics = train_epoch(steps, state, train_images, train_labels, config.batch_size,
                                       jax.random.fold_in(shuffle_key, epoch),
                                       config.steps_per_dispatch, bar,
                                       first_step=(epoch - 1) * steps_per_epoch)
    t1 = time.perf_counter()
    val_metrics, _ = evaluate(steps, state.variables, test_images, test_labels,
                              config.eval_batch_size)
    t2 = time.perf_counter()
    record = {"epoch": epoch, "step": int(state.step),
              "train_loss": train_metrics["loss"], "train_data_loss": train_metrics["data_loss"],
              "train_l2_loss": train_metrics["l2_loss"],
              "train_accuracy": train_metrics["accuracy"],
              "val_loss": val_metrics["loss"], "val_accuracy": val_metrics["accuracy"],
              "epoch_seconds": t1 - t0, "eval_seconds": t2 - t1}
    bar.close(f"loss={record['train_loss']:.4f} accuracy={record['train_accuracy']:.4f} "
              f"val_loss={record['val_loss']:.4f} val_accuracy={record['val_accuracy']:.4f}")
    logging.info("epoch %d/%d: train loss %.4f acc %.4f | val loss %.4f acc %.4f | %.1f s",
                 epoch, config.epochs, record["train_loss"], record["train_accuracy"],
                 record["val_loss"], record["val_accuracy"], record["epoch_seconds"])
    append_jsonl(run.metrics_jsonl, record)
    history.append(record)
    payload = {"epoch": epoch, "state": state}
    if record["val_accuracy"] > best:
      best = record["val_accuracy"]
      checkpoint.save(run.best, payload)
    checkpoint.save(run.last, payload)
    write_summary("running" if epoch < config.epochs else "completed")
    for callback in callbacks:
      callback(epoch, record, state)
  # The in-memory state is the last checkpoint's; the best one is read back only when it is
  # another epoch (the best checkpoint is written on strict improvement: the first maximum).
  final_epoch = history[-1]["epoch"]
  best_epoch = max(history, key=lambda r: r["val_accuracy"])["epoch"]

  def report(variables: dict, epoch: int, path: pathlib.Path) -> dict[str, Any]:
    metrics, predictions = evaluate(steps, variables, test_images, test_labels,
                                    config.eval_batch_size)
    return {"epoch": epoch, "split": "test", "checkpoint": str(path.relative_to(run.root)),
            **evaluation.report(dataset.test_labels, predictions, dataset.info.class_names,
                                metrics["loss"])}

  evaluations = {"final": report(state.variables, final_epoch, run.last)}
  if best_epoch == final_epoch:
    evaluations["best"] = {**evaluations["final"],
                           "checkpoint": str(run.best.relative_to(run.root))}
  else:
    restored = checkpoint.restore(run.best, {"epoch": 0, "state": state})
    evaluations["best"] = report(restored["state"].variables, int(restored["epoch"]), run.best)
  return write_summary("completed", evaluations)
