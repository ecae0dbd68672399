"""Prints a Keras-style summary of an experiment's model (layers, output shapes, parameters).

  python scripts/summary.py --experiment=vgg_cifar10 [--dataset=...] [--json]
"""

import json

from absl import flags

from jaxlab import cli, runtime
from jaxlab.experiment import build_model
from jaxlab.summary import format_summary, summarize

cli.define_experiment_flags()
flags.DEFINE_bool("json", False, "Print JSON (total_params, trainable_params, "
                  "non_trainable_params, layers) instead of the table.")
FLAGS = flags.FLAGS


@cli.user_errors_exit
def main(argv):
  runtime.start(FLAGS)
  summary = summarize(build_model(FLAGS.experiment, FLAGS.dataset))
  if FLAGS.json:
    print(json.dumps({"experiment": FLAGS.experiment, **summary}, indent=2))
  else:
    print(format_summary(summary, FLAGS.experiment))


if __name__ == "__main__":
  cli.run(main)
