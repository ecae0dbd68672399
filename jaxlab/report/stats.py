"""The report's statistics over seeds: t intervals, Welch's test, Holm's correction, tiers.

Means with their t intervals, Welch's test and the interval of a difference, Holm's correction
for a family of tests, Spearman's rank agreement, and the tiers of experiments the data cannot
tell apart. Every function takes plain lists of floats."""

from __future__ import annotations

import math
import re
import statistics
from typing import Any, Sequence


def scipy_stats():
  """scipy.stats, imported when a statistic is first computed: a lab that declares its
  questions (`jaxlab.report.findings`) computes none, and scipy.stats takes about half a
  second to import, at every start of a script."""
  from scipy import stats
  return stats


ALPHA = 0.05  # The family-wise error rate of the report's tests, and 1 - the intervals' level.


def t_interval(values: Sequence[float], confidence: float = 1 - ALPHA
               ) -> tuple[float, float] | None:
  """The two-sided t interval of the mean of `values` (None below two values)."""
  values = list(values)
  if len(values) < 2:
    return None
  mean, sem = statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))
  half = float(scipy_stats().t.ppf(0.5 + confidence / 2, len(values) - 1)) * sem
  return mean - half, mean + half


def spread(values: Sequence[float], seeds: Sequence[Any]) -> dict[str, Any]:
  """Mean, sample standard deviation (n - 1; None below two values), its 95% t interval, n,
  and each seed's value."""
  values = list(values)
  interval = t_interval(values)
  return {"mean": statistics.fmean(values) if values else None,
          "std": statistics.stdev(values) if len(values) > 1 else None,
          "ci95": list(interval) if interval else None,
          "n": len(values),
          "per_seed": {str(s): v for s, v in zip(seeds, values)}}


def _welch(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float | None]:
  """mean(a) - mean(b), the variance of that difference, and its Welch-Satterthwaite degrees of
  freedom (None when neither sample varies). Variances are exact (`statistics`), so seeds that
  ended at the same accuracy give zero, not a rounding residue."""
  va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
  delta = statistics.fmean(a) - statistics.fmean(b)
  if va + vb == 0:
    return delta, 0.0, None
  df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
  return delta, va + vb, df


def welch_p_value(a: Sequence[float], b: Sequence[float]) -> float | None:
  """Two-sided p-value of Welch's t-test (unequal variances) between two samples of seeds;
  None when either has fewer than two values or both have no variance."""
  if len(a) < 2 or len(b) < 2:
    return None
  delta, variance, df = _welch(a, b)
  if df is None:
    return None
  return float(2 * scipy_stats().t.sf(abs(delta) / math.sqrt(variance), df))


def difference(a: Sequence[float], b: Sequence[float]) -> dict[str, Any] | None:
  """mean(a) - mean(b), its 95% Welch interval (Welch-Satterthwaite degrees of freedom) and
  Welch's two-sided p; None unless both have two values or more."""
  if len(a) < 2 or len(b) < 2:
    return None
  delta, variance, df = _welch(a, b)
  if df is None:
    return {"difference": delta, "ci95": [delta, delta], "p": None}
  half = float(scipy_stats().t.ppf(1 - ALPHA / 2, df)) * math.sqrt(variance)
  return {"difference": delta, "ci95": [delta - half, delta + half],
          "p": welch_p_value(a, b)}


POWER = 0.8  # The chance of calling a real difference real that a seed count is planned for.
PRACTICAL_SEEDS = 50  # Beyond this many seeds per experiment: no practical number.


def welch_power(difference: float, std_a: float, std_b: float, n: int, level: float) -> float:
  """The power of a two-sided Welch's t-test at `level` with `n` seeds per experiment, for a
  true `difference` of means and true standard deviations `std_a`, `std_b`: the chance that
  the test calls the difference real. From the noncentral t distribution (SciPy's) with the
  Welch-Satterthwaite degrees of freedom of the true spreads (at n = 3 or 4 this overstates
  the power a little: at n = 3, 0.80 here is about 0.70 by simulation)."""
  va, vb = std_a ** 2 / n, std_b ** 2 / n
  if va + vb == 0:
    return 1.0 if difference else level
  df = (va + vb) ** 2 / (va ** 2 / (n - 1) + vb ** 2 / (n - 1))
  ncp = abs(difference) / math.sqrt(va + vb)
  critical = float(scipy_stats().t.ppf(1 - level / 2, df))
  # The lower tail as the upper tail of -ncp: SciPy's cdf deep in the lower tail can be NaN.
  return float(scipy_stats().nct.sf(critical, df, ncp) + scipy_stats().nct.sf(critical, df, -ncp))


def seeds_needed(a: Sequence[float], b: Sequence[float], tests: int = 1,
                 power: float = POWER) -> int | None:
  """The fewest seeds per experiment (2 to PRACTICAL_SEEDS) at which Welch's test, Holm-corrected
  over `tests` comparisons, would call the observed difference of `a` and `b`'s means real with
  `power`, if the observed difference and spreads are the true ones; None where no practical
  number would (no difference observed, or one too small for the spread). The level is
  ALPHA / tests: what Holm's correction asks of the first comparison it rejects, so the count is
  enough for any of them."""
  if len(a) < 2 or len(b) < 2:
    return None
  delta = statistics.fmean(a) - statistics.fmean(b)
  if delta == 0:
    return None
  std_a, std_b = statistics.stdev(a), statistics.stdev(b)
  level = ALPHA / max(tests, 1)
  return next((n for n in range(2, PRACTICAL_SEEDS + 1)
               if welch_power(delta, std_a, std_b, n, level) >= power), None)


def holm(p_values: Sequence[float | None]) -> list[float | None]:
  """Holm's step-down adjusted p-values of a family of tests (None stays None and does not
  count as a test): reject where the adjusted p is below ALPHA, at a family-wise error rate of
  ALPHA."""
  tested = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
  adjusted: list[float | None] = [None] * len(p_values)
  running = 0.0
  for rank, (p, i) in enumerate(tested):
    running = max(running, min(1.0, (len(tested) - rank) * p))
    adjusted[i] = running
  return adjusted


EXACT_PERMUTATIONS = 8  # Up to 8 pairs (40,320 orderings) Spearman's p is computed exactly.


def spearman(x: Sequence[float], y: Sequence[float]) -> dict[str, Any] | None:
  """Spearman's rank correlation of paired values and its two-sided p (None below 3 pairs): by
  every permutation up to EXACT_PERMUTATIONS pairs, by the t approximation above."""
  if len(x) < 3:
    return None
  x, y = list(x), list(y)
  rho = float(scipy_stats().spearmanr(x, y).statistic)
  if len(x) <= EXACT_PERMUTATIONS:  # Exact: every ordering of y (the t approximation is off).
    p = float(scipy_stats().permutation_test(
        (y,), lambda v: scipy_stats().spearmanr(x, v).statistic, permutation_type="pairings",
        alternative="two-sided").pvalue)
  else:
    p = float(scipy_stats().spearmanr(x, y).pvalue)
  return {"rho": None if math.isnan(rho) else rho, "p": None if math.isnan(p) else p,
          "n": len(x)}


def indistinguishable_tiers(samples: dict[str, Sequence[float]]) -> list[list[str]]:
  """Experiments in tiers the data cannot split: the first tier is the best mean and every
  experiment whose difference from it is not significant (Welch, Holm-corrected over the
  tier's tests); the next tier starts from the best of the rest, and so on. Experiments with
  fewer than two seeds form no tier (their spread is unknown)."""
  left = {k: list(v) for k, v in samples.items() if len(v) >= 2}
  tiers = []
  while left:
    order = sorted(left, key=lambda k: -statistics.fmean(left[k]))
    best, others = order[0], order[1:]
    adjusted = holm([welch_p_value(left[best], left[k]) for k in others])
    # A test that cannot be made (no variance in either) cannot tell them apart either.
    tier = [best] + [k for k, p in zip(others, adjusted) if p is None or p >= ALPHA]
    tiers.append(tier)
    for k in tier:
      del left[k]
  return tiers


def seed_figure(text: str) -> dict[str, float | None]:
  """A report's accuracy as printed ("0.8217 / 0.8638": final / best; "0.976": final)."""
  numbers = [float(x) for x in re.findall(r"\d+(?:\.\d+)?", text or "")]
  return {"final": numbers[0] if numbers else None,
          "best": numbers[1] if len(numbers) > 1 else None}
