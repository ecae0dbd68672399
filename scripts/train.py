"""Trains one catalog experiment into a run directory, resuming it if it was interrupted.

  python scripts/train.py --experiment=mlp_dropout --dataset=fashion_mnist --workdir=runs/x
"""

from absl import app, flags, logging

from jaxlab import cli
from jaxlab.config import resolve_config
from jaxlab.train import train_and_evaluate

cli.define_experiment_flags()
flags.DEFINE_string("workdir", None, "Run directory (created; resumed if it holds a run). "
                    "Default: runs/EXPERIMENT.")
flags.DEFINE_string("data_dir", None, "Directory with the data set's raw files or a TFDS copy.")
flags.DEFINE_bool("download", False, "Let TFDS download and prepare the data set (needs network "
                  "and TensorFlow).")
flags.DEFINE_integer("epochs", None, "Epochs to train. Default: the experiment's.")
flags.DEFINE_integer("batch_size", None, "Training batch size. Default: the experiment's.")
flags.DEFINE_integer("eval_batch_size", None, "Batch size for validation. Default: 1000.")
flags.DEFINE_float("learning_rate", None, "Learning rate. Default: the experiment's (1e-3).")
flags.DEFINE_string("optimizer", None, "adam, sgd, momentum, nadam or rmsprop. Default: adam.")
flags.DEFINE_integer("seed", None, "Seed of initialization, shuffling and dropout. Default: 0.")
flags.DEFINE_integer("train_limit", None, "Use only the first N training examples.")
flags.DEFINE_string("precision", None, "float32 (default) or bf16 (bfloat16 compute, float32 "
                    "parameters, optimizer state and loss).")
flags.DEFINE_integer("steps_per_dispatch", None, "Train steps per compiled call. Default: 50.")
flags.DEFINE_bool("progress", None, "Show a progress bar. Default: when stderr is a terminal.")

FLAGS = flags.FLAGS
OVERRIDES = ("dataset", "data_dir", "download", "epochs", "batch_size", "eval_batch_size",
             "learning_rate", "optimizer", "seed", "train_limit", "precision",
             "steps_per_dispatch")


@cli.user_errors_exit
def main(argv):
  logging.set_verbosity(logging.INFO)
  config = resolve_config(FLAGS.experiment, **{k: FLAGS[k].value for k in OVERRIDES})
  workdir = FLAGS.workdir or f"runs/{config.experiment}"
  summary = train_and_evaluate(config, workdir, progress=FLAGS.progress)
  print(f"{config.experiment} on {config.dataset}: final validation accuracy "
        f"{summary['final_val_accuracy']:.4f} (best {summary['best_val_accuracy']:.4f} at epoch "
        f"{summary['best_epoch']}); run directory: {workdir}")


if __name__ == "__main__":
  app.run(main)
