"""Runs a whole lab: every experiment of it, for every seed, each into its own run directory.

  python scripts/run_lab.py --lab=lab02 --workdir=runs/lab02 --dataset=fashion_mnist
      [--experiments=mlp_baseline,mlp_dropout] [--seeds=0,1,2] [--epochs=...] ...

Writes DIR/EXPERIMENT/seed_S/ (ordinary run directories) and DIR/lab.json, prints the results
table at the end, and exits with status 1 if any run failed (2 for bad input). SIGTERM or
Ctrl-C stops the lab as it stops train.py: a checkpoint, then status 75.

Many workers share one lab: `--workers=N` starts N on this machine (one GPU, or a share of the
CPU cores, each), and any number of run_lab.py processes on the same --workdir (a SLURM job
array, several machines on a shared file system) claim its runs one group at a time, with no
run trained twice. The worker that finishes the last group prints the table; a worker exits
with status 1 only if a run it trained failed.
"""

import sys

from absl import flags, logging

from jaxlab import cli
from jaxlab.training import process
from jaxlab.lab.runner import LAB_FILE, LabRunner, plan_lab, settle
from jaxlab.lab.workers import run_workers
from jaxlab.files import read_json
from jaxlab.report import results_table

cli.define_kernels_flag()
cli.define_lab_flag(required=True)
flags.DEFINE_string("workdir", None, "Lab directory: DIR/lab.json and DIR/EXPERIMENT/seed_S/.")
flags.DEFINE_list("experiments", None, "Only these experiments of the lab. Default: all of "
                  "them, in the lab's order.")
flags.DEFINE_list("seeds", ["0"], "Seeds to train each experiment with.")
flags.DEFINE_integer("workers", 1, "Start this many worker processes on this machine, one "
                     "device each (a GPU each, or an equal share of the CPU cores), that share "
                     "the lab's runs; several run_lab.py processes started by hand or by SLURM "
                     "on one lab directory share it the same way.", lower_bound=1)
flags.DEFINE_bool("until_settled", False, "After the seeds of --seeds, add seeds, round by "
                  "round, to the experiments of the lab's questions that the seeds so far cannot "
                  "settle (jaxlab.lab.runner.settle), until each is settled or more seeds would "
                  "not settle it within --max_seeds; lab.json records every round.")
flags.DEFINE_integer("max_seeds", 8, "With --until_settled: the most seeds an experiment gets.",
                     lower_bound=2)
flags.DEFINE_bool("progress", None, "Per-epoch progress bars. Default: when stderr is a "
                  "terminal.")
cli.define_compilation_cache_flag()
cli.define_loop_flag()
cli.define_distributed_flags()
# --dataset, --epochs, --batch_size, ...: the overrides of scripts/train.py, applied to every run.
OVERRIDES = cli.define_config_flags(exclude=("seed",))
flags.mark_flag_as_required("workdir")
FLAGS = flags.FLAGS


@cli.user_errors_exit
def main(argv):
  cli.start(FLAGS)
  logging.set_verbosity(logging.INFO)
  lab = cli.load_lab()
  overrides = cli.config_overrides(OVERRIDES)
  runs = plan_lab(lab, FLAGS.workdir, FLAGS.experiments, cli.parse_list(FLAGS.seeds, int, "seeds"),
                  overrides)
  settings = {k: v for k, v in overrides.items() if v is not None}
  if FLAGS.workers > 1:  # Checked above (lab, experiments, settings); the workers do the rest.
    argv = [a for a in sys.argv[1:] if not a.startswith(("--workers", "-workers"))]
    sys.exit(run_workers(FLAGS.workers, [sys.executable, sys.argv[0], *argv]))
  runners = []  # The lab's declared runs, then each round's (--until_settled).

  def make_runner(planned):
    runners.append(LabRunner(lab, FLAGS.workdir, planned, settings, progress=FLAGS.progress,
                             loop=FLAGS.loop))
    return runners[-1]

  runner = make_runner(runs)
  with process.stop_on_signals():
    record = runner.run()
    if FLAGS.until_settled:
      chosen = list(dict.fromkeys(r.experiment for r in runs))
      standing = settle(lab, FLAGS.workdir, chosen, FLAGS.max_seeds, overrides, settings,
                        make_runner, runner.say)
      record = read_json(f"{FLAGS.workdir}/{LAB_FILE}")
  failed = [r for r in record["runs"] if r["status"] == "failed"]
  done = sum(r["status"] == "completed" for r in record["runs"])
  if runners[-1].last_out:  # The worker that finished the lab's last group prints its table.
    print(results_table(FLAGS.workdir))
  print(f"\n{lab.name}: {done} of {len(record['runs'])} runs completed"
        + (f", {len(failed)} failed" if failed else "") + f"; lab directory: {FLAGS.workdir}")
  for r in failed:
    print(f"  failed: {r['path']}: {r['error']}")
  if FLAGS.until_settled:
    rounds = record.get("rounds", [])
    print(f"{lab.name}: {len(rounds)} round(s) of added seeds; the comparisons:")
    for entry in standing:
      print(f"  {entry['comparison']} ({'/'.join(map(str, entry['seeds']))} seeds): "
            f"{entry['why']}")
  if any(r.trained_failed for r in runners):  # 1 only for a run this worker trained.
    sys.exit(1)


if __name__ == "__main__":
  cli.run(main)
