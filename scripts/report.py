"""Builds the lab report of every run directory under a folder.

  python scripts/report.py --runs=runs/lab02 --out=runs/lab02/report

Writes OUT/report.md (with its PNG figures), OUT/report.html (one self-contained page) and
OUT/report.json (the table as data). Reads run directories only.
"""

from absl import flags

from jaxlab import cli
from jaxlab.report import build_report

flags.DEFINE_string("runs", None, "Folder to search for run directories (any depth) and "
                    "lab.json files.")
flags.DEFINE_string("out", None, "Folder for the report. Default: RUNS/report.")
flags.mark_flag_as_required("runs")
FLAGS = flags.FLAGS


@cli.user_errors_exit
def main(argv):
  out = FLAGS.out or f"{FLAGS.runs.rstrip('/')}/report"
  document = build_report(FLAGS.runs, out)
  completed = sum(r["status"] == "completed" for r in document["runs"])
  print(f"report of {len(document['experiments'])} experiments, {completed} of "
        f"{len(document['runs'])} runs completed: {out}/report.md, {out}/report.html, "
        f"{out}/report.json")


if __name__ == "__main__":
  cli.run(main)
