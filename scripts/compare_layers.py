"""Compares every layer's output of a jaxlab model with Keras's, on a random batch, in eval mode.

  python scripts/compare_layers.py --experiment=NAME --keras_weights=FILE [--batch_size=8]

FILE (`.keras` or `.weights.h5`) is loaded twice: by Keras itself (a `.weights.h5` into the
architecture jaxlab declares) and by jaxlab's importer. Prints shape, max absolute and max
relative error per layer; exits with status 1 if a layer diverges beyond --rtol.
"""

import sys

import numpy as np
from absl import flags

from jaxlab import cli
from jaxlab.inspection.compare import capture, compare
from jaxlab.experiment import build_model
from jaxlab.experiment import get_experiment
from jaxlab.keras.model import import_keras, keras_capture, to_keras
from jaxlab.keras.weights import import_keras_weights
from jaxlab.models import plan_of

cli.define_kernels_flag()
cli.define_experiment_flags()
flags.DEFINE_string("keras_weights", None, "A Keras .weights.h5 or .keras file.")
flags.DEFINE_integer("batch_size", 8, "Random examples to compare on.", lower_bound=1)
flags.DEFINE_integer("seed", 0, "Seed of the random batch.")
flags.DEFINE_float("rtol", 1e-5, "Largest max relative error a layer may have.")
flags.mark_flag_as_required("keras_weights")
FLAGS = flags.FLAGS


@cli.user_errors_exit
def main(argv):
  cli.start(FLAGS)
  cli.load_lab()
  exp = get_experiment(FLAGS.experiment)
  model = build_model(exp, FLAGS.dataset)
  plan_of(model, "compare_layers.py (Keras parity)")
  variables = import_keras_weights(model, FLAGS.keras_weights)
  keras = import_keras()
  if FLAGS.keras_weights.endswith(".keras"):
    net = keras.models.load_model(FLAGS.keras_weights, compile=False)
  else:
    net = to_keras(model)
    net.load_weights(FLAGS.keras_weights)
  x = np.random.default_rng(FLAGS.seed).random((FLAGS.batch_size,) + model.input_shape(),
                                               dtype=np.float32)
  result = compare(capture(model, variables, x, softmax_output=True),
                   keras_capture(net, model, x), FLAGS.rtol)
  print(f"{exp.name}: jaxlab vs Keras, {FLAGS.batch_size} random examples, eval mode")
  print(result.table())
  if not result.ok:
    sys.exit(1)


if __name__ == "__main__":
  cli.run(main)
