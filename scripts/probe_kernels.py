"""What XLA:CPU's kernel options do on this machine, float32 and bfloat16, op by op.

  python scripts/probe_kernels.py [--dtypes=float32,bfloat16] [--steps=3] [--json]

For a matmul, a convolution and the convolution's backward pass: under each of
`jaxlab.kernels`' candidates and XLA's oneDNN options, which library runs it (XLA's own,
YNNPACK or oneDNN; "as float32" where XLA converts bfloat16 operands first) and at what rate.
On a CPU with AMX this shows whether `--precision=bf16` can reach it from JAX.
"""

import json

from absl import flags

from jaxlab import cli, kernels
from jaxlab.runtime import environment

flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Operand dtypes to probe.")
flags.DEFINE_integer("steps", 3, "Timed calls per op (after 3 warm-up calls).", lower_bound=1)
flags.DEFINE_bool("json", False, "Print JSON instead of a table.")
FLAGS = flags.FLAGS


@cli.user_errors_exit
def main(argv):
  from jaxlab import profiling  # JAX: after the flags are read.
  for dtype in FLAGS.dtypes:
    if dtype not in ("float32", "bfloat16"):
      raise ValueError(f"unknown dtype {dtype!r}; known: float32, bfloat16")
  rows = profiling.probe_kernels({**kernels.OPTIONS, **profiling.ONEDNN_OPTIONS},
                                 FLAGS.dtypes, FLAGS.steps)
  if FLAGS.json:
    print(json.dumps({"environment": environment(), "rows": rows}, indent=2))
    return
  env = environment()
  print(f"{env.get('cpu', env['device'])}, {env.get('cores', '?')} cores; JAX {env['jax']} "
        f"on {env['backend']}")
  print("| dtype | op | kernels | library | GFLOP/s |\n| --- | --- | --- | --- | --- |")
  for r in rows:
    print(f"| {r['dtype']} | {r['op']} | {r['kernels']} | {r.get('library', r.get('error'))} "
          f"| {r['gflops']:.1f} |" if "gflops" in r else
          f"| {r['dtype']} | {r['op']} | {r['kernels']} | {r['error']} | |")


if __name__ == "__main__":
  cli.run(main)
