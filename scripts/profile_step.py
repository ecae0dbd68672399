"""Profiles an experiment's compiled train and eval steps on this machine's backend.

  python scripts/profile_step.py --experiment=vgg_cifar10 [--batch_size=128] [--precision=bf16]
      [--steps=50] [--json] [--trace_dir=DIR] [--hlo_dir=DIR]

For each step: compile time, XLA's FLOPs and bytes accessed, argument/output/temporary bytes,
the median step time, and the achieved FLOP/s as a fraction of a matrix-multiply peak measured
in the same run.
"""

import json
import pathlib

import jax
import numpy as np
from absl import flags

from jaxlab import cli, errors, runtime
from jaxlab.perf import profiling
from jaxlab.config import TrainConfig
from jaxlab.experiment import build_model, load_lab, resolve_config
from jaxlab.models import describe_precision, op_precisions
from jaxlab.data import DATASETS
from jaxlab.optim import make_optimizer
from jaxlab.summary import forward_flops
from jaxlab.state import create_group_state, create_train_state
from jaxlab.steps import make_steps

cli.define_kernels_flag()
cli.define_experiment_flag()
flags.DEFINE_string("lab", None, "A lab file (path/to/my_lab.py) to load first, for an "
                    "experiment it declares.")
OVERRIDES = cli.define_config_flags(["dataset", "batch_size", "precision"])
flags.DEFINE_integer("steps", 50, "Timed steps (after 3 warm-up steps).", lower_bound=1)
flags.DEFINE_bool("json", False, "Print JSON instead of a table.")
flags.DEFINE_string("trace_dir", None, "Write a jax.profiler trace of 5 train steps here.")
flags.DEFINE_string("hlo_dir", None, "Write the optimized HLO of both steps here.")
flags.DEFINE_integer("seeds", 1, "Profile the step of K members as one vmapped group.",
                     lower_bound=1)
flags.DEFINE_string("checkpoint_dir", None, "Also measure what saving the train state costs the "
                    "training loop, synchronously and in the background, writing it here.")
FLAGS = flags.FLAGS


def profile(config: TrainConfig, steps: int, trace_dir: str | None = None,
            hlo_dir: str | None = None, checkpoint_dir: str | None = None,
            members: int = 1) -> dict:
  """Compiles and times `config`'s train and eval steps on random data of its shape; with
  `members` K > 1, the steps of K members as one vmapped group (each its own batch)."""
  experiment, batch_size, precision = config.experiment, config.batch_size, config.precision
  info = DATASETS.get(config.dataset)
  model = build_model(experiment, info, precision)
  compiled_steps = make_steps(model)
  tx = make_optimizer(config.optimizer)
  rng = np.random.default_rng(0)
  lead = (members,) if members > 1 else ()
  images = jax.device_put(rng.integers(0, 256, lead + (batch_size,) + info.image_shape,
                                       np.uint8))
  labels = jax.device_put(rng.integers(0, info.num_classes, lead + (batch_size,), np.uint8))
  if members > 1:
    state = create_group_state(model, tx, list(range(members)), [config.learning_rate] * members)
    train_step, eval_step = compiled_steps.group_train_step, compiled_steps.group_eval_step
    eval_images, eval_labels = images[0], labels[0]
  else:
    state = create_train_state(model, tx, config.seed, config.learning_rate)
    train_step, eval_step = compiled_steps.train_step, compiled_steps.eval_step
    eval_images, eval_labels = images, labels
  model_flops = forward_flops(model) * batch_size * members

  train, train_stats = profiling.compile_stats(train_step, state, images, labels)
  holder = [state]

  def run_train():
    holder[0], metrics = train(holder[0], images, labels)
    return metrics

  evaluate, eval_stats = profiling.compile_stats(eval_step, state.variables, eval_images,
                                                 eval_labels)
  results = {}
  for name, stats, run, flops in (("train_step", train_stats, run_train, 3 * model_flops),
                                  ("eval_step", eval_stats,
                                   lambda: evaluate(holder[0].variables, eval_images,
                                                    eval_labels),
                                   model_flops)):
    seconds = profiling.median_seconds(run, steps)
    results[name] = {"compile_seconds": stats.compile_seconds, "xla_flops": stats.flops,
                     "model_flops": flops, "bytes_accessed": stats.bytes_accessed,
                     "argument_bytes": stats.argument_bytes, "output_bytes": stats.output_bytes,
                     "temp_bytes": stats.temp_bytes, "median_step_seconds": seconds}
    if hlo_dir:
      path = pathlib.Path(hlo_dir)
      path.mkdir(parents=True, exist_ok=True)
      (path / f"{experiment}.{name}.hlo.txt").write_text(stats.hlo_text)
  peaks = {p: profiling.matmul_peak_flops(p) for p in sorted(set(op_precisions(model).values()))}
  peak = profiling.model_peak_flops(model, peaks)
  for r in results.values():
    # XLA's count misses work done in library calls (cuDNN convolutions on a GPU), so the
    # achieved rate uses the larger of XLA's count and the model's Dense/Conv2D count.
    flops = max(r["xla_flops"], r["model_flops"])
    r["flops_per_second"] = flops / r["median_step_seconds"]
    r["fraction_of_peak"] = r["flops_per_second"] / peak
  extra = {}
  if trace_dir:
    profiling.write_trace(run_train, trace_dir)
    events = profiling.device_events(trace_dir)
    extra = {"trace_top_ops": profiling.top_ops(events),
             "trace_breakdown": profiling.op_breakdown(events, train_stats.hlo_text)}
  if checkpoint_dir:
    extra["checkpoint"] = profiling.checkpoint_cost(holder[0], checkpoint_dir)
  for r in results.values():
    r["median_member_step_seconds"] = r["median_step_seconds"] / members
  return {"experiment": experiment, "dataset": info.name, "batch_size": batch_size,
          "members": members,
          "precision": precision, "computes": describe_precision(model),
          **runtime.environment(), "matmul_peaks_flops_per_second": peaks,
          "matmul_peak_flops_per_second": peak, **results,
          **extra}


def format_table(r: dict) -> str:
  lines = [f"{r['experiment']} on {r['dataset']}, batch {r['batch_size']}, {r['precision']}, "
           + (f"{r['members']} members (one vmapped group; FLOPs and times are of all), "
              if r["members"] > 1 else "") +
           f"{r['backend']} ({r['device']})"
           + (f", kernels {r['kernels']}" if "kernels" in r else "")
           + "; measured matmul peak " + ", ".join(
               f"{p} {v / 1e12:.3f}" for p, v in r["matmul_peaks_flops_per_second"].items())
           + " TFLOP/s" + (f" (this model's mix of them: "
                           f"{r['matmul_peak_flops_per_second'] / 1e12:.3f})"
                           if len(r["matmul_peaks_flops_per_second"]) > 1 else ""),
           f"computes in {r['computes']}"]
  rows = [("", "train_step", "eval_step"),
          ("compile (s)",) + tuple(f"{r[s]['compile_seconds']:.2f}" for s in ("train_step", "eval_step")),
          ("XLA GFLOP",) + tuple(f"{r[s]['xla_flops'] / 1e9:.3f}" for s in ("train_step", "eval_step")),
          ("model GFLOP",) + tuple(f"{r[s]['model_flops'] / 1e9:.3f}" for s in ("train_step", "eval_step")),
          ("bytes accessed (MB)",) + tuple(f"{r[s]['bytes_accessed'] / 1e6:.1f}" for s in ("train_step", "eval_step")),
          ("argument bytes (MB)",) + tuple(f"{r[s]['argument_bytes'] / 1e6:.1f}" for s in ("train_step", "eval_step")),
          ("output bytes (MB)",) + tuple(f"{r[s]['output_bytes'] / 1e6:.1f}" for s in ("train_step", "eval_step")),
          ("temp bytes (MB)",) + tuple(f"{r[s]['temp_bytes'] / 1e6:.1f}" for s in ("train_step", "eval_step")),
          ("median step (ms)",) + tuple(f"{r[s]['median_step_seconds'] * 1e3:.3f}" for s in ("train_step", "eval_step")),
          ("per member (ms)",) + tuple(f"{r[s]['median_member_step_seconds'] * 1e3:.3f}" for s in ("train_step", "eval_step")),
          ("TFLOP/s",) + tuple(f"{r[s]['flops_per_second'] / 1e12:.3f}" for s in ("train_step", "eval_step")),
          ("fraction of peak",) + tuple(f"{r[s]['fraction_of_peak']:.1%}" for s in ("train_step", "eval_step"))]
  lines += [f"{a:<22}{b:>14}{c:>14}" for a, b, c in rows]
  if r.get("checkpoint"):
    c = r["checkpoint"]
    lines.append(f"saving the train state ({c['bytes'] / 1e6:.1f} MB, median of {c['repeats']}): "
                 f"the loop waits {c['sync_seconds']:.3f} s writing synchronously, "
                 f"{c['async_blocking_seconds']:.3f} s with the background writer (which then "
                 f"writes for {c['async_background_seconds']:.3f} s while training goes on)")
  if r.get("trace_breakdown"):
    b = r["trace_breakdown"]
    lines.append(f"traced device time of 5 train steps: {b['matmul_fraction']:.1%} in matrix "
                 f"multiplies and convolutions ({b['matmul_microseconds'] / 1e3:.3f} ms), "
                 f"{b['other_microseconds'] / 1e3:.3f} ms in the rest")
  if r.get("trace_top_ops"):
    lines.append("costliest operations in the trace of 5 train steps:")
    lines += [f"  {op['fraction']:6.1%} {op['microseconds'] / 1e3:9.3f} ms {op['calls']:5d}x  "
              f"{op['name'][:90]}" for op in r["trace_top_ops"]]
  return "\n".join(lines)


@cli.user_errors_exit
def main(argv):
  runtime.start(FLAGS)
  for flag in ("trace_dir", "hlo_dir", "checkpoint_dir"):  # Folders the user named: writable?
    if FLAGS[flag].value:
      with errors.output(FLAGS[flag].value, f"--{flag}"):
        pathlib.Path(FLAGS[flag].value).mkdir(parents=True, exist_ok=True)
  if FLAGS.lab:
    load_lab(FLAGS.lab)
  config = resolve_config(FLAGS.experiment, **cli.config_overrides(OVERRIDES))
  result = profile(config, FLAGS.steps, FLAGS.trace_dir, FLAGS.hlo_dir, FLAGS.checkpoint_dir,
                   FLAGS.seeds)
  print(json.dumps(result, indent=2) if FLAGS.json else format_table(result))


if __name__ == "__main__":
  cli.run(main)
