"""Runs a whole lab: every experiment of it, for every seed, each into its own run directory.

  python scripts/run_lab.py --lab=lab02 --workdir=runs/lab02 --dataset=fashion_mnist
      [--experiments=mlp_baseline,mlp_dropout] [--seeds=0,1,2] [--epochs=...] ...

Writes DIR/EXPERIMENT/seed_S/ (ordinary run directories) and DIR/lab.json, prints the results
table at the end, and exits with status 1 if any run failed (2 for bad input). SIGTERM or
Ctrl-C stops the lab as it stops train.py: a checkpoint, then status 75.
"""

import sys

from absl import flags, logging

from jaxlab import cli, preemption
from jaxlab.experiment import load_lab
from jaxlab.lab import LabRunner, plan_lab
from jaxlab.report import results_table

cli.define_kernels_flag()
flags.DEFINE_string("lab", None, "A built-in lab (lab02, lab04_alexnet, lab04_vgg) or the path "
                    "of a Python file that declares experiments as experiments/lab02.py does.")
flags.DEFINE_string("workdir", None, "Lab directory: DIR/lab.json and DIR/EXPERIMENT/seed_S/.")
flags.DEFINE_list("experiments", None, "Only these experiments of the lab. Default: all of "
                  "them, in the lab's order.")
flags.DEFINE_list("seeds", ["0"], "Seeds to train each experiment with.")
flags.DEFINE_bool("progress", None, "Per-epoch progress bars. Default: when stderr is a "
                  "terminal.")
cli.define_compilation_cache_flag()
cli.define_loop_flag()
cli.define_distributed_flags()
# --dataset, --epochs, --batch_size, ...: the overrides of scripts/train.py, applied to every run.
OVERRIDES = cli.define_config_flags(exclude=("seed",))
flags.mark_flags_as_required(["lab", "workdir"])
FLAGS = flags.FLAGS


@cli.user_errors_exit
def main(argv):
  logging.set_verbosity(logging.INFO)
  lab = load_lab(FLAGS.lab)
  overrides = cli.config_overrides(OVERRIDES)
  runs = plan_lab(lab, FLAGS.workdir, FLAGS.experiments, cli.parse_list(FLAGS.seeds, int, "seeds"),
                  overrides)
  settings = {k: v for k, v in overrides.items() if v is not None}
  with preemption.stop_on_signals():
    record = LabRunner(lab, FLAGS.workdir, runs, settings, progress=FLAGS.progress).run()
  print(results_table(FLAGS.workdir))
  failed = [r for r in record["runs"] if r["status"] == "failed"]
  done = sum(r["status"] == "completed" for r in record["runs"])
  print(f"\n{lab.name}: {done} of {len(record['runs'])} runs completed"
        + (f", {len(failed)} failed" if failed else "") + f"; lab directory: {FLAGS.workdir}")
  for r in failed:
    print(f"  failed: {r['path']}: {r['error']}")
  if failed:
    sys.exit(1)


if __name__ == "__main__":
  cli.run(main)
