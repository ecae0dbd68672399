"""Trains one catalog experiment into a run directory, resuming it if it was interrupted.

  python scripts/train.py --experiment=mlp_dropout --dataset=fashion_mnist --workdir=runs/x
"""

from absl import app, flags, logging

from jaxlab import cli
from jaxlab.config import resolve_config
from jaxlab.train import train_and_evaluate

cli.define_experiment_flag()
flags.DEFINE_string("workdir", None, "Run directory (created; resumed if it holds a run). "
                    "Default: runs/EXPERIMENT.")
flags.DEFINE_bool("progress", None, "Show a progress bar. Default: when stderr is a terminal.")
# --dataset, --epochs, --batch_size, ...: one flag per TrainConfig setting.
OVERRIDES = cli.define_config_flags()
FLAGS = flags.FLAGS


@cli.user_errors_exit
def main(argv):
  logging.set_verbosity(logging.INFO)
  config = resolve_config(FLAGS.experiment, **cli.config_overrides(OVERRIDES))
  workdir = FLAGS.workdir or f"runs/{config.experiment}"
  summary = train_and_evaluate(config, workdir, progress=FLAGS.progress)
  print(f"{config.experiment} on {config.dataset}: final validation accuracy "
        f"{summary['final_val_accuracy']:.4f} (best {summary['best_val_accuracy']:.4f} at epoch "
        f"{summary['best_epoch']}); run directory: {workdir}")


if __name__ == "__main__":
  app.run(main)
