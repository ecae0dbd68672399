"""Builds the lab report of every run directory under a folder.

  python scripts/report.py --runs=runs/lab02 --out=runs/lab02/report

Writes OUT/report.md (with its PNG figures), OUT/report.html (one self-contained page) and
OUT/report.json (the table and every run's history as data). Reads run directories only (and,
for the sample images of a data set a lab file declares, that lab file).

With --with_runs, the runs' small files (lab.json, config.json, metrics.json, metrics.jsonl;
no checkpoints) are copied to OUT/runs first and the report is built from that copy, so that OUT
alone rebuilds it (as docs/results/lab02_fashion_mnist does):

  python scripts/report.py --runs=runs/lab02 --out=docs/results/lab02_fashion_mnist --with_runs
"""

from absl import flags

from jaxlab import cli
from jaxlab.report import build_report
from jaxlab.report.build import copy_small_files

flags.DEFINE_string("runs", None, "Folder to search for run directories (any depth) and "
                    "lab.json files.")
flags.DEFINE_string("out", None, "Folder for the report. Default: RUNS/report.")
flags.DEFINE_bool("with_runs", False, "Copy the runs' small files (no checkpoints) to OUT/runs "
                  "and build the report from that copy: OUT then holds all it needs to be "
                  "rebuilt.")
flags.mark_flag_as_required("runs")
FLAGS = flags.FLAGS


def load_labs_of_their_data(runs: str) -> None:
  """Loads the lab files that declared the runs' data sets this process does not know (a data
  set a lab file registers), where those files are at hand: the report then draws their
  samples. (Loading a lab file imports JAX; the report itself does not need it.)"""
  from jaxlab.data import DATASETS
  from jaxlab.report.runs import find_runs
  files = {r.about.get("declared_in") for r in find_runs(runs).runs
           if r.dataset and r.dataset not in DATASETS}
  if any(files):
    from jaxlab import experiment  # pylint: disable=g-import-not-at-top
    for path in sorted(experiment.recorded_path(f) for f in files if f):
      if path.is_file():
        experiment.load_lab(str(path))


@cli.user_errors_exit
def main(argv):
  cli.start(FLAGS)
  out = FLAGS.out or f"{FLAGS.runs.rstrip('/')}/report"
  runs = FLAGS.runs
  if FLAGS.with_runs:
    runs = copy_small_files(runs, f"{out}/runs")
  load_labs_of_their_data(runs)
  document = build_report(runs, out)
  completed = sum(r["status"] == "completed" for r in document["runs"])
  print(f"report of {len(document['experiments'])} experiments, {completed} of "
        f"{len(document['runs'])} runs completed: {out}/report.md, {out}/report.html, "
        f"{out}/report.json")


if __name__ == "__main__":
  cli.run(main)
