"""A lab's questions, answered from its runs with wording that follows the statistics.

A lab module declares what its seed report asked as `QUESTIONS`, a list of `Question`s:

  QUESTIONS = [Question("Depth", "Do 20 more layers help?", seed_answer="No: 0.968 against 0.976",
                        compare=(Compare("mlp_deep", "mlp_baseline", "23 layers of 128, not 3"),))]

`run_lab.py` records them in lab.json; the report answers each from the runs' validation
accuracies (or another metric the runs record, `on`: a user's own, `on="top2_accuracy"`), on
the summary the question names (`metric`: the final epoch's, or the mean of the last 3
epochs', less noisy): every comparison is a difference of means with its 95% Welch
interval, Welch's p and Holm's correction over all the comparisons of the report (one family),
said to be a difference only where the corrected test says so, and set against the seed
report's own figures (reproduced, reversed, or not resolved). One the seeds cannot settle says
how many seeds would (`stats.seeds_needed`), or that none would (too small a difference, or a
spread that comes from collapsed runs); and where the other summary gives another verdict, it
says so. A stability question looks at each listed experiment's
fall from its best epoch and its spread over seeds, beside the first experiment's (the
baseline's). This module is JAX-free: lab modules import it, and so does the report.
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any, Sequence

from jaxlab.errors import BadValue
from jaxlab.report.stats import ALPHA, PRACTICAL_SEEDS, difference, holm, seeds_needed, spearman

UNSTABLE_POINTS = 0.05  # A fall from the best epoch, or a spread over seeds, above 5 points.
# What a question may be answered on: the final epoch's accuracy, or the mean of the last 3.
METRICS = {"final": "final validation accuracy",
           "last3": "mean validation accuracy of the last 3 epochs"}


@dataclasses.dataclass(frozen=True)
class Compare:
  """`experiment` against `against`, differing by `change` (in words)."""

  experiment: str
  against: str
  change: str


@dataclasses.dataclass(frozen=True)
class Question:
  """One of the seed report's questions: its comparisons and/or the experiments whose stability
  it asks about, and the seed report's own answer (quoted or summarized)."""

  topic: str
  question: str
  seed_answer: str = ""
  compare: tuple[Compare, ...] = ()
  stability: tuple[str, ...] = ()
  metric: str = "final"  # A key of METRICS: the summary its comparisons are made on.
  on: str = "accuracy"  # The metric (val_<on> in metrics.jsonl) its comparisons are made on.

  def __post_init__(self):
    if self.metric not in METRICS:
      raise BadValue(f"question {self.topic!r}: unknown metric {self.metric!r}; known: "
                     f"{', '.join(METRICS)}")
    if not (isinstance(self.on, str) and self.on.isidentifier()):
      raise BadValue(f"question {self.topic!r}: `on` names a metric of the runs "
                     f"(accuracy, loss, or an experiment's own), got {self.on!r}")

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, data: dict[str, Any]) -> Question:
    return cls(data["topic"], data["question"], data.get("seed_answer", ""),
               tuple(Compare(**c) for c in data.get("compare", ())),
               tuple(data.get("stability", ())), data.get("metric", "final"),
               data.get("on", "accuracy"))


def _points(x: float) -> str:
  return f"{x * 100:+.1f}"


@dataclasses.dataclass
class Evidence:
  """What the report knows of each experiment: final accuracies over seeds, per-seed best and
  final epochs, and the seed report's final figure and data set."""

  final: dict[str, list[float]]
  best: dict[str, list[float]]
  seed_figure: dict[str, float | None]
  seed_dataset: dict[str, str]
  dataset: dict[str, str]
  last3: dict[str, list[float]] = dataclasses.field(default_factory=dict)
  # Every other metric the runs record: {name: {"final"|"last3": {experiment: per seed}}}.
  others: dict[str, dict[str, dict[str, list[float]]]] = dataclasses.field(default_factory=dict)

  def of(self, metric: str, on: str = "accuracy") -> dict[str, list[float]]:
    """Each experiment's per-seed values of `metric` (a summary of METRICS) of `on`."""
    if on != "accuracy":
      return self.others.get(on, {}).get(metric, {})
    return self.last3 if metric == "last3" else self.final

  def collapsed(self, name: str) -> int:
    """How many of `name`'s seeds collapsed: ended more than UNSTABLE_POINTS below their best
    epoch."""
    return sum(b - f > UNSTABLE_POINTS for b, f in zip(self.best.get(name, []),
                                                        self.final.get(name, [])))


def _compared(a: list[float], b: list[float]) -> dict[str, Any]:
  return difference(a, b) or {"difference": None, "ci95": None, "p": None}


def _comparison(c: Compare, evidence: Evidence, metric: str, on: str) -> dict[str, Any]:
  """`c` on `metric` of `on`, with the same comparison on the other summary as `other`."""
  other = "final" if metric == "last3" else "last3"
  a, b = (evidence.of(metric, on).get(name, []) for name in (c.experiment, c.against))
  found = {"experiment": c.experiment, "against": c.against, "change": c.change,
           "metric": metric, "on": on, "n": [len(a), len(b)], **_compared(a, b),
           "other": {"metric": other, **_compared(evidence.of(other, on).get(c.experiment, []),
                                                  evidence.of(other, on).get(c.against, []))},
           "collapsed": {name: evidence.collapsed(name) for name in (c.experiment, c.against)
                         if evidence.collapsed(name)}}
  fa, fb = evidence.seed_figure.get(c.experiment), evidence.seed_figure.get(c.against)
  found["seed_difference"] = (fa - fb if fa is not None and fb is not None and on == "accuracy"
                              else None)
  found["seed_dataset"] = evidence.seed_dataset.get(c.experiment, "")
  return found


def settled(found: dict[str, Any]) -> bool:
  """Whether a comparison calls its difference real (Holm-corrected)."""
  return found["p_holm"] is not None and found["p_holm"] < ALPHA


def _verdict(found: dict[str, Any]) -> str:
  """reproduced / reversed / not resolved: the seed report's difference against this one."""
  if found["seed_difference"] is None or found["p_holm"] is None:
    return ""
  if found["p_holm"] >= ALPHA:
    return "not resolved"
  same = (found["seed_difference"] > 0) == (found["difference"] > 0)
  return "reproduced" if same else "reversed"


def _sentence(found: dict[str, Any], tests: int) -> str:
  on = found.get("on", "accuracy")
  text = _comparison_sentence(found, tests)
  return text if on == "accuracy" else f"On validation {on}: {text}"


def _comparison_sentence(found: dict[str, Any], tests: int) -> str:
  a, b = f"`{found['experiment']}`", f"`{found['against']}`"
  if found["difference"] is None:
    short = found["experiment"] if found["n"][0] < 2 else found["against"]
    return (f"{a} against {b} ({found['change']}): not measured, `{short}` has fewer than two "
            "completed seeds.")
  d, (lo, hi) = found["difference"], found["ci95"]
  head = (f"{a} ({found['change']}) ends {_points(d)} points against {b} (95% CI {_points(lo)} "
          f"to {_points(hi)}")
  if found["p"] is None:
    return head + "; no spread to test against): not testable."
  stats = f"Welch p = {found['p']:.2g}, Holm-corrected over {tests} tests {found['p_holm']:.2g}"
  if found["p_holm"] < ALPHA:
    text = f"{head}; {stats}): a difference larger than the seeds' spread."
  else:
    text = (f"{head}; {stats}): inside the seeds' spread; these seeds cannot tell the two "
            "apart" + (" (p < 0.05 only before the correction)" if found["p"] < ALPHA else "")
            + ". " + _seeds_sentence(found))
  other = found["other"]
  if other["p_holm"] is not None and (other["p_holm"] < ALPHA) != (found["p_holm"] < ALPHA):
    words = METRICS[other["metric"]].replace("accuracy", found.get("on", "accuracy"))
    text += (f" On the {words} instead ({_points(other['difference'])} "
             f"points, Holm-corrected p {other['p_holm']:.2g}) the verdict is the other way: "
             + ("a difference larger than the spread." if other["p_holm"] < ALPHA
                else "inside the spread."))
  if found["seed_difference"] is not None:
    text += (f" The seed report ({found['seed_dataset'] or 'its data'}) had "
             f"{_points(found['seed_difference'])} points: {_verdict(found)}.")
  return text


def _seeds_sentence(found: dict[str, Any]) -> str:
  """What more seeds would do for a comparison that is not settled."""
  if found["collapsed"]:
    name, count = next(iter(found["collapsed"].items()))
    return (f"More seeds would not settle this by averaging: the spread of `{name}` comes from "
            f"collapsed runs ({count} of its seeds end more than {UNSTABLE_POINTS * 100:.0f} "
            "points below their best epoch); more would say how often it collapses.")
  if found["seeds_needed"] is None:
    return (f"No practical number of seeds (up to {PRACTICAL_SEEDS} each) would settle a "
            "difference this small for this spread.")
  return (f"About {found['seeds_needed']} seeds each would settle this, if the difference is "
          "real.")


def _stability(name: str, evidence: Evidence) -> dict[str, Any]:
  final, best = evidence.final.get(name, []), evidence.best.get(name, [])
  if not final:
    return {"experiment": name, "n": 0}
  falls = [b - f for b, f in zip(best, final)]
  found = {"experiment": name, "n": len(final), "final_mean": statistics.fmean(final),
           "final_std": statistics.stdev(final) if len(final) > 1 else None,
           "fall_from_best": statistics.fmean(falls) if falls else None}
  found["unstable"] = bool((found["fall_from_best"] or 0) > UNSTABLE_POINTS
                           or (found["final_std"] or 0) > UNSTABLE_POINTS)
  return found


def _stability_sentence(found: dict[str, Any], reference: dict[str, Any]) -> str:
  name = f"`{found['experiment']}`"
  if not found["n"]:
    return f"{name}: no completed run."
  std = "" if found["final_std"] is None else f" ± {found['final_std']:.4f} (std over seeds)"
  text = (f"{name} ends at {found['final_mean']:.4f}{std}, {found['fall_from_best'] * 100:.1f} "
          "points below its best epoch on average")
  if reference.get("n") and reference["experiment"] != found["experiment"]:
    ref_std = ("" if reference["final_std"] is None
               else f", std {reference['final_std'] * 100:.1f} points")
    text += (f" (`{reference['experiment']}`: {reference['fall_from_best'] * 100:.1f} points"
             f"{ref_std})")
  return text + (": unstable." if found["unstable"] else ": stable.")


def answer(questions: Sequence[Question], evidence: Evidence, baseline: str
           ) -> list[dict[str, Any]]:
  """Each question with its comparisons (Holm-corrected over every comparison of every
  question), its stability checks, and the sentences that say them."""
  found = [[_comparison(c, evidence, q.metric, q.on) for c in q.compare] for q in questions]
  flat = [f for fs in found for f in fs]
  adjusted = holm([f["p"] for f in flat])
  tests = sum(p is not None for p in adjusted)
  for f, p, p_other in zip(flat, adjusted, holm([f["other"]["p"] for f in flat])):
    f["p_holm"], f["other"]["p_holm"] = p, p_other
    f["verdict"] = _verdict(f)
    a, b = (evidence.of(f["metric"], f["on"]).get(name, [])
            for name in (f["experiment"], f["against"]))
    f["seeds_needed"] = None if f["collapsed"] else seeds_needed(a, b, tests)
  reference = _stability(baseline, evidence)
  answers = []
  for q, comparisons in zip(questions, found):
    stability = [_stability(name, evidence) for name in q.stability]
    sentences = ([_sentence(f, tests) for f in comparisons]
                 + [_stability_sentence(s, reference) for s in stability])
    answers.append({**q.to_json(), "comparisons": comparisons, "stability_checks": stability,
                    "answer": sentences})
  return answers


def rank_agreement(evidence: Evidence, means: dict[str, float]) -> dict[str, Any] | None:
  """Spearman's rank correlation between the seed report's final figures and these means, over
  the experiments that have both (what can be compared where the data sets differ)."""
  names = [n for n in means if evidence.seed_figure.get(n) is not None and means[n] is not None]
  found = spearman([evidence.seed_figure[n] for n in names], [means[n] for n in names])
  if found is None:
    return None
  datasets = sorted({evidence.seed_dataset.get(n, "") for n in names} - {""})
  here = sorted({evidence.dataset.get(n, "") for n in names} - {""})
  return {**found, "experiments": names, "seed_datasets": datasets, "datasets": here}


def rank_sentence(agreement: dict[str, Any] | None) -> str:
  if agreement is None or agreement["rho"] is None:
    return "Too few experiments with a figure in the seed report to compare rankings."
  rho, p = agreement["rho"], agreement["p"]
  strength = ("strong" if abs(rho) >= 0.7 else "moderate" if abs(rho) >= 0.4 else "weak")
  return (f"Rank agreement with the seed report over {agreement['n']} experiments (its figures on "
          f"{', '.join(agreement['seed_datasets']) or 'its data'}, these on "
          f"{', '.join(agreement['datasets'])}): Spearman ρ = {rho:.2f} (p = {p:.2g}), a "
          f"{strength} {'positive' if rho > 0 else 'negative'} agreement"
          + ("" if p < ALPHA else ", not distinguishable from none at this n") + ".")
