"""The Keras peer of train.py: Keras 3 `fit` of an experiment's architecture on its real data
set, one seed after another in one process (for whole-process comparisons with jaxlab).

  python scripts/keras_train.py --experiment=mlp_big_small_big --dataset=fashion_mnist \\
      --epochs=5 --seeds=0,1,2,3
"""

import time

from absl import flags

from jaxlab import cli
from jaxlab.perf.benchmark import keras_train
from jaxlab.experiment import resolve_config
from jaxlab.training.state import setup
from jaxlab.data import load_dataset

cli.define_experiment_flag()
OVERRIDES = cli.define_config_flags(["dataset", "data_dir", "epochs", "batch_size"])
flags.DEFINE_list("seeds", ["0"], "Seeds to train, one after another.")
FLAGS = flags.FLAGS


@cli.user_errors_exit
def main(argv):
  cli.start(FLAGS)
  config = resolve_config(FLAGS.experiment, **cli.config_overrides(OVERRIDES))
  dataset = load_dataset(config.dataset, data_dir=config.data_dir)
  built = setup(config, dataset.info)
  for seed in cli.parse_list(FLAGS.seeds, int, "seeds"):
    start = time.perf_counter()
    history = keras_train(built, dataset, config.epochs, config.batch_size, seed)
    print(f"keras {config.experiment} seed {seed}: final val_accuracy "
          f"{history['val_accuracy'][-1]:.4f} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
  cli.run(main)
