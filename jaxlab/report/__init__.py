"""Lab reports built from run directories alone: nothing of training is imported here.

  build_report(runs_dir, out_dir)  -> OUT/report.md, report.html, report.json, PNG figures
  results_table(runs_dir)          -> the results table as Markdown

Imported lazily, so that a lab module declaring its questions (jaxlab.report.findings) does not
load matplotlib.
"""

_EXPORTS = {"build_report": "build", "experiment_rows": "build", "results_table": "build",
            "find_runs": "runs"}


def __getattr__(name: str):
  if name in _EXPORTS:
    import importlib
    return getattr(importlib.import_module(f"jaxlab.report.{_EXPORTS[name]}"), name)
  raise AttributeError(f"module 'jaxlab.report' has no attribute {name!r}")
