"""The table's numbers: mean and spread over seeds, Welch's t-test, the seed reports' figures."""

from __future__ import annotations

import math
import re
import statistics
from typing import Any, Sequence

from scipy import stats as scipy_stats


def spread(values: Sequence[float], seeds: Sequence[Any]) -> dict[str, Any]:
  """Mean, sample standard deviation (n - 1; None below two values), n, and each seed's value."""
  values = list(values)
  return {"mean": statistics.fmean(values) if values else None,
          "std": statistics.stdev(values) if len(values) > 1 else None,
          "n": len(values),
          "per_seed": {str(s): v for s, v in zip(seeds, values)}}


def welch_p_value(a: Sequence[float], b: Sequence[float]) -> float | None:
  """Two-sided p-value of Welch's t-test (unequal variances) between two samples of seeds;
  None when either has fewer than two values or both have no variance."""
  if len(a) < 2 or len(b) < 2:
    return None
  p = float(scipy_stats.ttest_ind(list(a), list(b), equal_var=False).pvalue)
  return None if math.isnan(p) else p


def seed_figure(text: str) -> dict[str, float | None]:
  """A report's accuracy as printed ("0.8217 / 0.8638": final / best; "0.976": final)."""
  numbers = [float(x) for x in re.findall(r"\d+(?:\.\d+)?", text or "")]
  return {"final": numbers[0] if numbers else None,
          "best": numbers[1] if len(numbers) > 1 else None}
