"""Profiles an experiment's compiled train and eval steps on this machine's backend.

  python scripts/profile_step.py --experiment=vgg_cifar10 [--batch_size=128] [--precision=bf16]
      [--steps=50] [--json] [--trace_dir=DIR] [--hlo_dir=DIR]

For each step: compile time, XLA's FLOPs and bytes accessed, argument/output/temporary bytes,
the median step time, and the achieved FLOP/s as a fraction of a matrix-multiply peak measured
in the same run.
"""

import json
import pathlib

from absl import flags

from jaxlab import cli, errors
from jaxlab.experiment import resolve_config
from jaxlab.perf.profiling import format_table, profile

cli.define_kernels_flag()
cli.define_experiment_flag()
cli.define_lab_flag()
OVERRIDES = cli.define_config_flags(["dataset", "batch_size", "precision"])
flags.DEFINE_integer("steps", 50, "Timed steps (after 3 warm-up steps).", lower_bound=1)
flags.DEFINE_bool("json", False, "Print JSON instead of a table.")
flags.DEFINE_string("trace_dir", None, "Write a jax.profiler trace of 5 train steps here.")
flags.DEFINE_string("hlo_dir", None, "Write the optimized HLO of both steps here.")
flags.DEFINE_integer("seeds", 1, "Profile the step of K members as one vmapped group.",
                     lower_bound=1)
flags.DEFINE_string("checkpoint_dir", None, "Also measure what saving the train state costs the "
                    "training loop, synchronously and in the background, writing the saves "
                    "here (removed after).")
FLAGS = flags.FLAGS


@cli.user_errors_exit
def main(argv):
  cli.start(FLAGS)
  for flag in ("trace_dir", "hlo_dir", "checkpoint_dir"):  # Folders the user named: writable?
    if FLAGS[flag].value:
      with errors.output(FLAGS[flag].value, f"--{flag}"):
        pathlib.Path(FLAGS[flag].value).mkdir(parents=True, exist_ok=True)
  cli.load_lab()
  config = resolve_config(FLAGS.experiment, **cli.config_overrides(OVERRIDES))
  result = profile(config, FLAGS.steps, FLAGS.trace_dir, FLAGS.hlo_dir, FLAGS.checkpoint_dir,
                   FLAGS.seeds)
  print(json.dumps(result, indent=2) if FLAGS.json else format_table(result))


if __name__ == "__main__":
  cli.run(main)
