"""Lab reports built from run directories alone: nothing of training is imported here.

  build_report(runs_dir, out_dir)  -> OUT/report.md, report.html, report.json, PNG figures
  results_table(runs_dir)          -> the results table as Markdown
"""

from jaxlab.report.build import build_report, experiment_rows, results_table  # noqa: F401
from jaxlab.report.runs import find_runs  # noqa: F401
