"""Whole processes, side by side: train.py training K seeds as one vmapped group, against Keras
training the same K seeds one after another in one process (scripts/keras_train.py).

  python scripts/benchmark_seeds.py --experiment=mlp_big_small_big --dataset=fashion_mnist \\
      --epochs=5 --seeds=0,1,2,3 --rounds=3

Each round runs every command once, in an order that rotates from round to round, and times
the whole process (start-up, data, compilation, training, evaluation). jaxlab runs twice: with
no persistent compilation cache (it compiles everything) and with a warm one (as a second run
of the architecture finds it). Reports medians and the ratios jaxlab / Keras.
"""

import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

from absl import flags

from jaxlab import cli, errors
from jaxlab.perf.benchmark import machine, rotation

cli.define_experiment_flag()
OVERRIDES = cli.define_config_flags(["dataset", "data_dir", "epochs", "batch_size"])
flags.DEFINE_list("seeds", ["0", "1", "2", "3"], "Seeds: one vmapped group for jaxlab, one "
                  "after another for Keras.")
flags.DEFINE_integer("rounds", 3, "Rounds; every command runs once per round.", lower_bound=1)
flags.DEFINE_string("json_out", "docs/benchmarks_seeds.json", "Where to write the JSON results.")
flags.DEFINE_string("markdown_out", "docs/benchmarks_seeds.md", "Where to write the table.")
FLAGS = flags.FLAGS
ROOT = pathlib.Path(__file__).resolve().parent.parent


def main_args() -> list[str]:
  args = [f"--experiment={FLAGS.experiment}", f"--seeds={','.join(FLAGS.seeds)}"]
  for name in OVERRIDES:
    if FLAGS[name].value is not None:
      args.append(f"--{name}={FLAGS[name].value}")
  return args


def timed(command: list[str], env: dict[str, str]) -> float:
  start = time.perf_counter()
  result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
  seconds = time.perf_counter() - start
  errors_said = [l for l in result.stderr.splitlines() if l.startswith("error: ")]
  if result.returncode == 2 and errors_said:  # The command refused its input: so does this.
    raise errors.BadValue(f"{pathlib.Path(command[1]).name}: {errors_said[-1][7:]}")
  if result.returncode != 0:
    raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n"
                       f"{result.stderr[-2000:]}")
  return seconds


@cli.user_errors_exit
def main(argv):
  cli.start(FLAGS)
  cli.parse_list(FLAGS.seeds, int, "seeds")
  work = pathlib.Path(tempfile.mkdtemp(prefix="jaxlab-benchmark-seeds-"))
  env = {**os.environ}
  warm_env = {**env, "JAXLAB_XLA_CACHE_DIR": str(work / "warm")}
  train = [sys.executable, "scripts/train.py", *main_args(), "--noprogress"]
  commands = {
      "jaxlab, no compilation cache": (lambda r: train + [f"--workdir={work / f'cold{r}'}",
                                                          "--nocompilation_cache"], env),
      "jaxlab, warm compilation cache": (lambda r: train + [f"--workdir={work / f'warm{r}'}"],
                                         warm_env),
      "keras": (lambda r: [sys.executable, "scripts/keras_train.py", *main_args()], env),
  }
  print("filling the warm cache with one jaxlab run", file=sys.stderr)
  timed(train + [f"--workdir={work / 'fill'}"], warm_env)
  seconds: dict[str, list[float]] = {name: [] for name in commands}
  for r in range(FLAGS.rounds):
    for name in rotation(list(commands), r):
      make, command_env = commands[name]
      seconds[name].append(timed(make(r), command_env))
      print(f"round {r + 1}/{FLAGS.rounds}: {name} {seconds[name][-1]:.1f} s", file=sys.stderr)
  medians = {name: statistics.median(values) for name, values in seconds.items()}
  keras = medians["keras"]
  result = {"machine": machine(), "experiment": FLAGS.experiment, "args": main_args(),
            "seeds": len(FLAGS.seeds), "rounds": FLAGS.rounds, "seconds": seconds,
            "median_seconds": medians,
            "ratio_over_keras": {name: m / keras for name, m in medians.items()
                                 if name != "keras"}}
  m = result["machine"]
  lines = [f"## Whole processes: {FLAGS.experiment}, {len(FLAGS.seeds)} seeds", "",
           f"Machine: {m['cpu']}, {m['cpu_count']} CPU cores; JAX {m['jax']} on {m['backend']}.",
           f"Arguments: `{' '.join(main_args())}`; median of {FLAGS.rounds} rounds, the "
           "commands interleaved in a rotating order. jaxlab trains the seeds as one vmapped "
           "group (`train.py --seeds`), Keras one after another in one process "
           "(`keras_train.py`).", "",
           "| command | seconds (median) | per seed | / Keras | all rounds |",
           "| --- | --- | --- | --- | --- |"]
  for name, values in seconds.items():
    ratio = f"{medians[name] / keras:.2f}" if name != "keras" else "1"
    lines.append(f"| {name} | {medians[name]:.1f} | {medians[name] / len(FLAGS.seeds):.1f} | "
                 f"{ratio} | {', '.join(f'{v:.1f}' for v in values)} |")
  table = "\n".join(lines) + "\n"
  print(table)
  cli.write_outputs((FLAGS.json_out, json.dumps(result, indent=2) + "\n"),
                    (FLAGS.markdown_out, table))


if __name__ == "__main__":
  cli.run(main)
