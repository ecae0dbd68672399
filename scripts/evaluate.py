"""Recomputes a run's validation report from a checkpoint: accuracy, confusion matrix, per class.

  python scripts/evaluate.py --workdir=runs/alexnet [--checkpoint=best|last] [--json]
"""

import json

import jax
from absl import flags

from jaxlab import cli
from jaxlab import metrics as metrics_lib
from jaxlab.data import load_dataset
from jaxlab.training.restore import load_run
from jaxlab.training.steps import evaluate, make_steps

cli.define_kernels_flag()
flags.DEFINE_string("workdir", None, "Run directory written by scripts/train.py.")
flags.DEFINE_enum("checkpoint", "best", ["best", "last"], "Which checkpoint to evaluate.")
flags.DEFINE_string("data_dir", None, "Where the data set is, if not where the run found it.")
flags.DEFINE_bool("json", False, "Print the report as JSON.")
flags.mark_flag_as_required("workdir")
FLAGS = flags.FLAGS


@cli.user_errors_exit
def main(argv):
  cli.start(FLAGS)
  config, built, state, epoch = load_run(FLAGS.workdir, FLAGS.checkpoint)
  dataset = load_dataset(config.dataset, data_dir=FLAGS.data_dir or config.data_dir)
  metrics, predictions = evaluate(make_steps(built), state.variables,
                                  jax.device_put(dataset.test_images),
                                  jax.device_put(dataset.test_labels), config.eval_batch_size)
  result = {"experiment": config.experiment, "dataset": config.dataset,
            "checkpoint": FLAGS.checkpoint, "epoch": epoch,
            **metrics_lib.report(dataset.test_labels, predictions, dataset.info.class_names,
                                metrics["loss"]),
            "metrics": metrics}
  if FLAGS.json:
    print(json.dumps(result, indent=2))
  else:
    print(f"{config.experiment} on {config.dataset}, {FLAGS.checkpoint} checkpoint (epoch {epoch}), "
          "test split:")
    print(metrics_lib.format_confusion(result, dataset.info.class_names))


if __name__ == "__main__":
  cli.run(main)
