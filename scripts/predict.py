"""Writes class probabilities (softmax, eval mode) of a run's model for the inputs in a .npy file.

  python scripts/predict.py --workdir=DIR --inputs=X.npy --output=P.npy [--checkpoint=best|last]

X is the model's input as is, with no preprocessing: float32 in [0, 1], of the shape its first
layer takes: images (N, H, W, C) as the run's data set has them, or for the MLPs of the plan
families the pixels flattened, (N, 784). P has shape (N, classes).
"""

import pathlib

import jax
import numpy as np
from absl import flags

from jaxlab import cli, errors
from jaxlab.errors import BadValue
from jaxlab.training.restore import load_run
from jaxlab.data import DATASETS
from jaxlab.models import input_shape

cli.define_kernels_flag()
flags.DEFINE_string("workdir", None, "Run directory.")
flags.DEFINE_string("inputs", None, "A .npy file of model inputs.")
flags.DEFINE_string("output", None, "Where to write the probabilities (.npy).")
flags.DEFINE_enum("checkpoint", "best", ["best", "last"], "Which checkpoint to use.")
flags.DEFINE_integer("batch_size", 1024, "Examples per compiled call.", lower_bound=1)
flags.mark_flags_as_required(["workdir", "inputs", "output"])
FLAGS = flags.FLAGS


@cli.user_errors_exit
def main(argv):
  cli.start(FLAGS)
  config, built, state, _ = load_run(FLAGS.workdir, FLAGS.checkpoint)
  model = built.model
  try:
    x = np.load(FLAGS.inputs, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise BadValue(f"--inputs {FLAGS.inputs!r} is not a readable .npy file ({e})") from None
  expected = input_shape(model, built.example_shape)
  if tuple(x.shape[1:]) != expected:
    raise BadValue(f"--inputs has shape {x.shape}; {config.experiment} takes (N, "
                   f"{', '.join(map(str, expected))})")
  if not np.issubdtype(x.dtype, np.floating):
    raise BadValue(f"--inputs has dtype {x.dtype}; the model takes float32 inputs as they are "
                   "(scale uint8 images to [0, 1] first)")
  predict = jax.jit(lambda v, x: jax.nn.softmax(model.apply(v, x, train=False), axis=-1))
  out = [np.asarray(predict(state.variables, x[i:i + FLAGS.batch_size].astype(np.float32)))
         for i in range(0, len(x), FLAGS.batch_size)]
  classes = len(DATASETS.get(config.dataset).class_names)
  probabilities = np.concatenate(out) if out else np.zeros((0, classes), np.float32)
  with errors.output(FLAGS.output, "--output"):
    pathlib.Path(FLAGS.output).parent.mkdir(parents=True, exist_ok=True)
    np.save(FLAGS.output, probabilities)
  print(f"wrote {FLAGS.output}: probabilities of shape {probabilities.shape}")


if __name__ == "__main__":
  cli.run(main)
