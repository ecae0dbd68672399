"""What XLA:CPU's kernel options do on this machine, float32 and bfloat16, op by op.

  python scripts/probe_kernels.py [--dtypes=float32,bfloat16] [--options=xla,ynn_dot] [--steps=3]

For a matmul, a convolution, the convolution's backward pass and an MLP's training step: under
each of `jaxlab.training.kernels`' choices and XLA's other oneDNN options, which library runs it (XLA's
own, YNNPACK or oneDNN), the dtype it reads (`f32` for a bfloat16 op: XLA converted its
operands to float32 first) and at what rate. An option that kills the process on an op (an abort inside
XLA) is reported on that row, and the probe goes on in a new process.
On a CPU with AMX this shows whether `--precision=bf16` can reach it from JAX: a bfloat16 row
that reads `bf16` (`onednn bf16` or `ynnpack bf16`).
"""

import json
import sys

from absl import flags

from jaxlab import cli
from jaxlab.errors import BadValue
from jaxlab.perf import profiling
from jaxlab.training import kernels, process

flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Operand dtypes to probe.")
flags.DEFINE_integer("steps", 3, "Timed calls per op (after 3 warm-up calls).", lower_bound=1)
flags.DEFINE_list("options", None, "Kernel options to probe, by name. Default: all of "
                  "them, jaxlab.training.kernels' choices and XLA's other oneDNN options.")
flags.DEFINE_bool("json", False, "Print JSON instead of a table.")
FLAGS = flags.FLAGS


@cli.user_errors_exit
def main(argv):
  cli.start(FLAGS)
  for dtype in FLAGS.dtypes:
    if dtype not in ("float32", "bfloat16"):
      raise BadValue(f"unknown dtype {dtype!r}; known: float32, bfloat16")
  known = {**kernels.OPTIONS, **profiling.ONEDNN_OPTIONS}
  for name in FLAGS.options or ():
    if name not in known:
      raise BadValue(f"unknown kernel option {name!r}; known: {', '.join(known)}")
  options = {name: known[name] for name in FLAGS.options} if FLAGS.options else known
  rows = profiling.probe_kernels(options, FLAGS.dtypes, FLAGS.steps,
                                 log=lambda s: print(s, file=sys.stderr, flush=True))
  env = process.environment()
  if FLAGS.json:
    print(json.dumps({"environment": env, "rows": rows}, indent=2))
    return
  print(f"{env.get('cpu', env['device'])}, {env.get('cores', '?')} cores; JAX {env['jax']} "
        f"on {env['backend']}")
  print("| dtype | op | kernels | library | GFLOP/s |\n| --- | --- | --- | --- | --- |")
  for r in rows:
    rate = f"{r['gflops']:.1f}" if "gflops" in r else ""
    print(f"| {r['dtype']} | {r['op']} | {r['kernels']} | {r.get('library', r.get('error'))} "
          f"| {rate} |")


if __name__ == "__main__":
  cli.run(main)
