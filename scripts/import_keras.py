"""Imports a Keras 3 model's weights into a new jaxlab run directory.

  python scripts/import_keras.py --experiment=NAME --keras_weights=FILE --workdir=DIR

FILE is a `.weights.h5` or `.keras` file of the experiment's architecture. Layers are matched in
order with every shape checked; the checkpoints (epoch 0) hold the imported params and
BatchNorm statistics, so evaluate.py, predict.py and train.py work on DIR.
"""

from absl import flags

from jaxlab import cli
from jaxlab.experiment import build_model, resolve_config
from jaxlab.keras.weights import import_keras_weights
from jaxlab.keras.weights import write_imported_run

cli.define_experiment_flags()
flags.DEFINE_string("keras_weights", None, "A Keras .weights.h5 or .keras file.")
flags.DEFINE_string("workdir", None, "New run directory to write.")
flags.mark_flags_as_required(["keras_weights", "workdir"])
FLAGS = flags.FLAGS


@cli.user_errors_exit
def main(argv):
  cli.start(FLAGS)
  cli.load_lab()
  config = resolve_config(FLAGS.experiment, dataset=FLAGS.dataset)
  model = build_model(config.experiment, config.dataset)
  variables = import_keras_weights(model, FLAGS.keras_weights)
  run = write_imported_run(FLAGS.workdir, config, variables, FLAGS.keras_weights)
  print(f"imported {FLAGS.keras_weights} as {config.experiment}; run directory: {run.root}")


if __name__ == "__main__":
  cli.run(main)
