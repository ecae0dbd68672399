"""Trains one experiment (the catalog's, or a --lab file's) into a run directory, resuming it if
it was interrupted.

  python scripts/train.py --experiment=mlp_dropout --dataset=fashion_mnist --workdir=runs/x
  python scripts/train.py --experiment=mlp_dropout --seeds=0,1,2,3 --learning_rates=1e-3,3e-4

With --seeds and/or --learning_rates, every (learning rate, seed) of the grid is one member of a
group trained as one vmapped state by one compiled program, each into its own ordinary run
directory: WORKDIR/seed_S, WORKDIR/lr_R, or WORKDIR/lr_R/seed_S.

SIGTERM or Ctrl-C saves a checkpoint at the next step boundary and exits with status 75; the
same command resumes. A second signal aborts at once.
"""

from absl import flags, logging

from jaxlab import cli
from jaxlab.training import process
from jaxlab.rundir import lock
from jaxlab.errors import BadValue
from jaxlab.rundir.run import member_dir, member_path

cli.define_kernels_flag()
cli.define_experiment_flag()
cli.define_lab_flag()
flags.DEFINE_string("workdir", None, "Run directory (created; resumed if it holds a run). "
                    "Default: runs/EXPERIMENT.")
flags.DEFINE_bool("progress", None, "Show a progress bar. Default: when stderr is a terminal.")
flags.DEFINE_bool("restart", False, "Discard what --workdir holds (checkpoints, metrics, "
                  "events) and train from scratch, e.g. after the experiment's declaration "
                  "changed.")
flags.DEFINE_list("seeds", None, "Train these seeds as one vmapped group (WORKDIR/seed_S each).")
flags.DEFINE_list("learning_rates", None, "Train these learning rates as one vmapped group "
                  "(WORKDIR/lr_R each; with --seeds, their grid).")
cli.define_compilation_cache_flag()
cli.define_loop_flag()
cli.define_distributed_flags()
# --dataset, --epochs, --batch_size, ...: one flag per TrainConfig setting.
OVERRIDES = cli.define_config_flags()
FLAGS = flags.FLAGS


def members() -> tuple[str, list[int] | None, list[float] | None]:
  """The run directory, the seeds and the learning rates the flags ask for."""
  return (FLAGS.workdir or f"runs/{FLAGS.experiment}",
          cli.parse_list(FLAGS.seeds, int, "seeds"),
          cli.parse_list(FLAGS.learning_rates, float, "learning_rates"))


def refuse_busy() -> None:
  """A busy run directory is refused before JAX and the data load (train_group's lock is the
  guarantee; this makes the refusal immediate)."""
  workdir, seeds, rates = members()
  lock.refuse_busy(*(member_path(workdir, s, r) for s in seeds or [None]
                     for r in rates or [None]))


@cli.user_errors_exit
def main(argv):
  refuse_busy()  # At once: before JAX starts, before the data loads.
  cli.start(FLAGS)
  logging.set_verbosity(logging.INFO)
  workdir, seeds, rates = members()
  from jaxlab.experiment import resolve_config  # pylint: disable=g-import-not-at-top
  from jaxlab.training.train import group_configs, train_group  # pylint: disable=g-import-not-at-top
  cli.load_lab()
  config = resolve_config(FLAGS.experiment, **cli.config_overrides(OVERRIDES))
  if seeds and FLAGS["seed"].present:
    raise BadValue("--seed and --seeds do not go together: give the seeds in --seeds")
  if rates and FLAGS["learning_rate"].present:
    raise BadValue("--learning_rate and --learning_rates do not go together")
  configs = group_configs(config, seeds, rates)
  workdirs = [member_dir(workdir, c, bool(seeds), bool(rates)) for c in configs]
  with process.stop_on_signals():
    summaries = train_group(configs, workdirs, progress=FLAGS.progress, restart=FLAGS.restart,
                            loop=FLAGS.loop)
  for c, summary, path in zip(configs, summaries, workdirs):
    print(f"{c.experiment} on {c.dataset}" + (f", seed {c.seed}" if seeds else "")
          + (f", learning rate {c.learning_rate:g}" if rates else "")
          + f": final validation accuracy {summary['final_val_accuracy']:.4f} (best "
          f"{summary['best_val_accuracy']:.4f} at epoch {summary['best_epoch']}); run "
          f"directory: {path}")


if __name__ == "__main__":
  cli.run(main)
