"""Trains one catalog experiment into a run directory, resuming it if it was interrupted.

  python scripts/train.py --experiment=mlp_dropout --dataset=fashion_mnist --workdir=runs/x

SIGTERM or Ctrl-C saves a checkpoint at the next step boundary and exits with status 75; the
same command resumes. A second signal aborts at once.
"""

from absl import flags, logging

from jaxlab import cli, preemption
from jaxlab.config import resolve_config
from jaxlab.experiment import load_lab
from jaxlab.train import train_and_evaluate

cli.define_experiment_flag()
flags.DEFINE_string("lab", None, "A lab file (path/to/my_lab.py) to load first, for an "
                    "experiment it declares.")
flags.DEFINE_string("workdir", None, "Run directory (created; resumed if it holds a run). "
                    "Default: runs/EXPERIMENT.")
flags.DEFINE_bool("progress", None, "Show a progress bar. Default: when stderr is a terminal.")
flags.DEFINE_bool("restart", False, "Discard what --workdir holds (checkpoints, metrics, "
                  "events) and train from scratch, e.g. after the experiment's declaration "
                  "changed.")
# --dataset, --epochs, --batch_size, ...: one flag per TrainConfig setting.
OVERRIDES = cli.define_config_flags()
FLAGS = flags.FLAGS


@cli.user_errors_exit
def main(argv):
  logging.set_verbosity(logging.INFO)
  if FLAGS.lab:
    load_lab(FLAGS.lab)
  config = resolve_config(FLAGS.experiment, **cli.config_overrides(OVERRIDES))
  workdir = FLAGS.workdir or f"runs/{config.experiment}"
  with preemption.stop_on_signals():
    summary = train_and_evaluate(config, workdir, progress=FLAGS.progress,
                                 restart=FLAGS.restart)
  print(f"{config.experiment} on {config.dataset}: final validation accuracy "
        f"{summary['final_val_accuracy']:.4f} (best {summary['best_val_accuracy']:.4f} at epoch "
        f"{summary['best_epoch']}); run directory: {workdir}")


if __name__ == "__main__":
  cli.run(main)
