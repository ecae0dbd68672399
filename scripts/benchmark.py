"""Benchmarks jaxlab's training loop against Keras 3 `fit` and PyTorch eager, side by side.

  python scripts/benchmark.py [--experiment=mlp_big_small_big] [--batch_size=128]
      [--epochs=5] [--examples=60000] [--peers=keras_fit,torch_eager]

Writes the results as JSON (--json_out) and as a Markdown table (--markdown_out).
"""

import json

from absl import flags

from jaxlab import cli
from jaxlab.perf.benchmark import PEERS, markdown, run_benchmark
from jaxlab.config import PRECISIONS
from jaxlab.data import DATASETS
from jaxlab.errors import BadValue
from jaxlab.experiment import resolve_config
from jaxlab.training.state import setup

cli.define_kernels_flag()
cli.define_lab_flag()
flags.DEFINE_string("experiment", "mlp_big_small_big", "Experiment whose architecture to train.")
flags.DEFINE_string("dataset", None, "Data set whose shape the random data takes. Default: the "
                    "experiment's.")
flags.DEFINE_integer("batch_size", 128, "Batch size for every loop.", lower_bound=1)
flags.DEFINE_integer("epochs", 5, "Timed epochs, after one warm-up epoch.", lower_bound=1)
flags.DEFINE_integer("examples", None, "Examples per epoch. Default: the data set's train size.",
                     lower_bound=1)
flags.DEFINE_list("peers", list(PEERS), f"Peers to time: {', '.join(PEERS)} (empty: jaxlab only).")
flags.DEFINE_enum("precision", "float32", list(PRECISIONS), "jaxlab's compute precision.")
flags.DEFINE_integer("seeds", 1, "Members K: jaxlab trains K seeds as one vmapped group, each "
                     "peer K models one after another.", lower_bound=1)
flags.DEFINE_string("json_out", "docs/benchmarks.json", "Where to write the JSON results.")
flags.DEFINE_string("markdown_out", "docs/benchmarks.md", "Where to write the Markdown table.")
FLAGS = flags.FLAGS


@cli.user_errors_exit
def main(argv):
  cli.start(FLAGS)
  cli.load_lab()
  config = resolve_config(FLAGS.experiment, dataset=FLAGS.dataset, precision=FLAGS.precision,
                          optimizer="adam", learning_rate=1e-3)  # The peers' optimizer.
  info = DATASETS.get(config.dataset)
  examples = FLAGS.examples or info.train_size
  if examples is None:
    raise BadValue(f"data set {info.name!r} has no official train size: give --examples")
  result = run_benchmark(setup(config, info), info.num_classes, FLAGS.batch_size, examples,
                         FLAGS.epochs, FLAGS.peers, members=FLAGS.seeds)
  result.update(experiment=config.experiment, dataset=info.name, precision=FLAGS.precision)
  title = f"{config.experiment}, batch {FLAGS.batch_size}, {FLAGS.precision}" + (
      f", {FLAGS.seeds} seeds" if FLAGS.seeds > 1 else "")
  table = markdown(result, title)
  print(table)
  cli.write_outputs((FLAGS.json_out, json.dumps(result, indent=2) + "\n"),
                    (FLAGS.markdown_out, "# Benchmarks\n\nWritten by `scripts/benchmark.py`.\n\n"
                     + table))


if __name__ == "__main__":
  cli.run(main)
