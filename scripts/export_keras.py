"""Writes a run directory's checkpoint as a Keras 3 model (`.keras`) or weights (`.weights.h5`).

  python scripts/export_keras.py --workdir=DIR --output=model.keras [--checkpoint=best|last]
"""

from absl import flags

from jaxlab import cli
from jaxlab.keras.weights import export_keras
from jaxlab.training.restore import load_run

flags.DEFINE_string("workdir", None, "Run directory.")
flags.DEFINE_string("output", None, "File to write: NAME.keras or NAME.weights.h5.")
flags.DEFINE_enum("checkpoint", "best", ["best", "last"], "Which checkpoint to export.")
flags.mark_flags_as_required(["workdir", "output"])
FLAGS = flags.FLAGS


@cli.user_errors_exit
def main(argv):
  cli.start(FLAGS)
  config, built, state, epoch = load_run(FLAGS.workdir, FLAGS.checkpoint)
  export_keras(built.model, state.variables, FLAGS.output)
  print(f"wrote {FLAGS.output} ({config.experiment}, {FLAGS.checkpoint} checkpoint, epoch {epoch})")


if __name__ == "__main__":
  cli.run(main)
