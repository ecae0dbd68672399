"""Prints a summary of an experiment's model: every layer (submodule) by path, its type, output
shape and parameters; for the plan families, as Keras's `model.summary()` prints it.

  python scripts/summary.py --experiment=vgg_cifar10 [--dataset=...] [--lab=my_lab.py] [--json]
"""

import json

from absl import flags

from jaxlab import cli
from jaxlab.data import DATASETS
from jaxlab.experiment import build_model, get_experiment
from jaxlab.inspection.summary import format_summary, summarize

cli.define_experiment_flags()
flags.DEFINE_bool("json", False, "Print JSON (total_params, trainable_params, "
                  "non_trainable_params, layers) instead of the table.")
FLAGS = flags.FLAGS


@cli.user_errors_exit
def main(argv):
  cli.start(FLAGS)
  cli.load_lab()
  info = DATASETS.get(FLAGS.dataset or get_experiment(FLAGS.experiment).dataset)
  summary = summarize(build_model(FLAGS.experiment, info), info.image_shape)
  if FLAGS.json:
    print(json.dumps({"experiment": FLAGS.experiment, **summary}, indent=2))
  else:
    print(format_summary(summary, FLAGS.experiment))


if __name__ == "__main__":
  cli.run(main)
