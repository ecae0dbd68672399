"""The report's statistics and findings, checked against definitions computed here in float64
NumPy/SciPy, and a report built from run directories written by hand (no training: the report
reads files only)."""

import json
import math
import statistics
import warnings

import numpy as np
import pytest
from scipy import stats as scipy_stats

from jaxlab.report import build_report
from jaxlab.report.build import copy_small_files
from jaxlab.report import findings
from jaxlab.report.findings import Compare, Question
from jaxlab.report.stats import (difference, holm, indistinguishable_tiers, spread,
                                 t_interval, welch_p_value)
from datafiles import write_idx_dataset

TOLERANCE = 1e-12  # Float64 formulas against SciPy's: equal up to rounding.


def test_t_interval_is_the_mean_plus_minus_t_times_the_standard_error():
  values = [0.8669, 0.8800, 0.8877]
  mean, sem = np.mean(values), np.std(values, ddof=1) / math.sqrt(3)
  half = scipy_stats.t.ppf(0.975, df=2) * sem
  assert t_interval(values) == pytest.approx((mean - half, mean + half), abs=TOLERANCE)
  assert t_interval([0.9]) is None
  assert spread(values, [0, 1, 2])["ci95"] == pytest.approx([mean - half, mean + half])


def test_difference_interval_and_p_are_welchs():
  a, b = [0.31, 0.52, 0.19], [0.8669, 0.8800, 0.8877]
  found = difference(a, b)
  reference = scipy_stats.ttest_ind(a, b, equal_var=False)
  interval = reference.confidence_interval(0.95)
  assert found["difference"] == pytest.approx(np.mean(a) - np.mean(b), abs=TOLERANCE)
  assert found["ci95"] == pytest.approx([interval.low, interval.high], abs=1e-9)
  assert found["p"] == pytest.approx(reference.pvalue, abs=TOLERANCE)
  assert difference([0.9], b) is None


def test_seeds_that_end_at_one_accuracy_have_no_variance_not_a_rounding_residue():
  # Accuracies are counts over examples: two seeds often end at exactly the same one.
  same, constant, varied = [1 / 48, 1 / 48], [0.5, 0.5, 0.5], [0.25, 0.75, 0.3]
  # One sample constant, the other not: Welch's test still applies (SciPy warns of the constant
  # sample, whose variance it computes with cancellation, but its p is right).
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    reference = scipy_stats.ttest_ind(varied, constant, equal_var=False).pvalue
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert difference(same, same)["p"] is None
    assert welch_p_value(same, same) is None
    assert welch_p_value(varied, constant) == pytest.approx(reference, rel=1e-9)


def test_holm_steps_down_and_keeps_untested_entries():
  # Sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> kept at 0.06.
  assert holm([0.01, 0.04, None, 0.03, 0.005]) == pytest.approx(
      [0.03, 0.06, None, 0.06, 0.02])
  assert holm([0.5, 0.9]) == [1.0, 1.0]  # Capped at 1.


def test_tiers_split_only_what_the_data_can():
  samples = {"a": [0.880, 0.882, 0.878], "b": [0.879, 0.884, 0.877],
             "c": [0.800, 0.801, 0.799], "d": [0.9]}  # d: one seed, no spread, no tier.
  assert indistinguishable_tiers(samples) == [["a", "b"], ["c"]]
  # A collapsed net whose seeds scatter widely cannot be told from the best at n = 3.
  wide = {"a": samples["a"], "x": [0.20, 0.75, 0.40]}
  assert indistinguishable_tiers(wide) == [["a", "x"]]


def evidence(final, best=None, figures=None):
  return findings.Evidence(final=final, best=best or final, seed_figure=figures or {},
                           seed_dataset={k: "mnist" for k in final},
                           dataset={k: "fashion_mnist" for k in final})


def test_answers_follow_the_statistics():
  final = {"base": [0.880, 0.882, 0.878], "same": [0.879, 0.884, 0.877],
           "worse": [0.800, 0.801, 0.799], "collapse": [0.30, 0.52, 0.19]}
  best = {**final, "collapse": [0.85, 0.84, 0.86]}
  questions = [Question("Shape", "Does it matter?", "Yes.",
                        (Compare("worse", "base", "w"), Compare("same", "base", "s"),
                         Compare("missing", "base", "m"))),
               Question("Instability", "Which fail?", stability=("collapse", "base"))]
  answers = findings.answer(questions, evidence(
      final, best, {"base": 0.97, "same": 0.95, "worse": 0.99}), "base")
  worse, same, missing = answers[0]["comparisons"]
  # Holm over the two testable comparisons: the larger raw p doubles at most.
  assert [worse["p_holm"], same["p_holm"]] == pytest.approx(holm([worse["p"], same["p"]]))
  assert worse["p_holm"] < 0.05 <= same["p_holm"]
  assert worse["verdict"] == "reversed"  # The seed report had it 2 points higher.
  assert same["verdict"] == "not resolved"
  text = answers[0]["answer"]
  assert "`worse` (w) ends -8.0 points against `base`" in text[0]
  assert "a difference larger than the seeds' spread" in text[0]
  assert "The seed report (mnist) had +2.0 points: reversed." in text[0]
  assert "inside the seeds' spread; these seeds cannot tell the two apart" in text[1]
  assert "not measured, `missing` has fewer than two completed seeds" in text[2]
  collapse, base = answers[1]["stability_checks"]
  assert collapse["unstable"] and not base["unstable"]
  assert collapse["fall_from_best"] == pytest.approx(
      statistics.fmean(b - f for b, f in zip(best["collapse"], final["collapse"])))
  assert answers[1]["answer"][0].endswith(": unstable.")


def test_rank_agreement_is_spearmans_over_experiments_with_a_figure():
  final = {"a": [0.9, 0.91], "b": [0.8, 0.81], "c": [0.3, 0.2], "d": [0.85, 0.86]}
  figures = {"a": 0.98, "b": 0.97, "c": 0.2, "d": None}
  means = {k: statistics.fmean(v) for k, v in final.items()}
  agreement = findings.rank_agreement(evidence(final, figures=figures), means)
  assert agreement["experiments"] == ["a", "b", "c"] and agreement["rho"] == pytest.approx(1.0)
  # Exact at small n: of the 3! orderings, the two perfectly (anti-)ordered are as extreme.
  assert agreement["p"] == pytest.approx(2 / 6)
  assert "Spearman ρ = 1.00" in findings.rank_sentence(agreement)


# ------------------------------------------------------------------ a report from files alone

EPOCHS = 5
LAB = [  # experiment, final accuracy per seed, best accuracy per seed
    ("base", [0.880, 0.882, 0.878], [0.885, 0.886, 0.884]),
    ("same", [0.880, 0.885, 0.878], [0.886, 0.887, 0.883]),
    ("worse", [0.800, 0.801, 0.799], [0.805, 0.806, 0.804]),
    ("collapse", [0.30, 0.52, 0.19], [0.85, 0.84, 0.86]),
]


def confusion(accuracy, rng):
  """A 10-class confusion matrix of 100 examples per class at about `accuracy`."""
  matrix = np.zeros((10, 10), int)
  for c in range(10):
    right = int(round(100 * accuracy))
    matrix[c, c] = right
    matrix[c] += np.bincount(rng.integers(0, 10, 100 - right), minlength=10)
  return matrix


def write_run(root, experiment, seed, final, best, data):
  rng = np.random.default_rng(seed)
  root.mkdir(parents=True)
  settings = {"experiment": experiment, "dataset": "mnist", "epochs": EPOCHS, "seed": seed,
              "batch_size": 32, "learning_rate": 0.001, "data_dir": str(data)}
  history = []
  for epoch in range(1, EPOCHS + 1):
    accuracy = best if epoch == 2 else final if epoch == EPOCHS else (best + final) / 2
    history.append({"epoch": epoch, "train_loss": 0.5 / epoch, "train_accuracy": accuracy + 0.03,
                    "val_loss": 1.0 - accuracy, "val_accuracy": accuracy,
                    "epoch_seconds": 2.0 + seed, "eval_seconds": 0.1, "time": 1e9 + epoch})
  (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
  (root / "config.json").write_text(json.dumps({
      "config": settings, "experiment": {"seed_accuracy": f"{final + 0.1:.4f}", "seed_dataset": "mnist"},
      "environment": {"backend": "cpu", "device": "cpu", "device_count": 1}}))
  (root / "metrics.json").write_text(json.dumps({
      "status": "completed", "epochs_completed": EPOCHS, "final_val_accuracy": final,
      "best_val_accuracy": best, "median_epoch_seconds": 2.0 + seed, "total_params": 1234,
      "group": [f"{experiment}/seed_{s}" for s in range(3)],
      "evaluation": {"final": {"confusion_matrix": confusion(final, rng).tolist()}}}))
  return history


@pytest.mark.slow  # Draws every figure twice: about 30 s.
def test_report_from_files_answers_the_labs_questions(tmp_path):
  data = tmp_path / "data"
  write_idx_dataset(data, n_train=40, n_test=20)
  lab = tmp_path / "lab"
  histories = {}
  for experiment, finals, bests in LAB:
    for seed, (final, best) in enumerate(zip(finals, bests)):
      histories[f"{experiment}/seed_{seed}"] = write_run(
          lab / experiment / f"seed_{seed}", experiment, seed, final, best, data)
  questions = [Question("Shape", "Does it matter?", "It does.",
                        (Compare("worse", "base", "w"), Compare("same", "base", "s"))),
               Question("Instability", "Which fail?", "Collapse fails.",
                        stability=("collapse",))]
  (lab / "lab.json").write_text(json.dumps({
      "lab": "handmade", "source": str(tmp_path / "experiments" / "handmade.py"),
      "settings": {"data_dir": str(data)}, "experiments": [e for e, _, _ in LAB],
      "seeds": [0, 1, 2], "questions": [q.to_json() for q in questions],
      "runs": [{"path": p, "status": "completed"} for p in histories]}))
  out = tmp_path / "out"
  document = build_report(lab, out)

  # Every run's per-epoch history, as metrics.jsonl has it: the report can be redrawn from it.
  assert {r["path"]: r["history"] for r in document["runs"]} == histories
  rows = {r["experiment"]: r for r in document["experiments"]}
  finals = {e: f for e, f, _ in LAB}
  for name, row in rows.items():
    assert row["final_val_accuracy"]["ci95"] == pytest.approx(list(t_interval(finals[name])))
    last = [statistics.fmean(r["val_accuracy"] for r in histories[f"{name}/seed_{s}"][-3:])
            for s in range(3)]
    assert row["last3_val_accuracy"]["mean"] == pytest.approx(statistics.fmean(last))
    assert row["timing"] == {"seconds_per_epoch": 3.0, "group_size": 3,
                             "seconds_per_member_epoch": 1.0, "device": "cpu",
                             "backend": "cpu", "kernels": None, "device_count": 1}
  raw = [rows[e]["p_value_vs_baseline"] for e in ("base", "same", "worse", "collapse")]
  assert [rows[e]["p_holm_vs_baseline"] for e in ("base", "same", "worse", "collapse")] == (
      pytest.approx(holm(raw)))
  found = document["findings"]
  assert {"same", "base"} <= set(found["tiers"][0]) and "worse" not in found["tiers"][0]
  assert [q["topic"] for q in found["questions"]] == ["Shape", "Instability"]

  markdown = (out / "report.md").read_text()
  page = (out / "report.html").read_text()
  for text in (markdown, page, (out / "report.json").read_text()):
    assert str(tmp_path) not in text  # No machine's path in any report file.
  assert "declared in `experiments/handmade.py`" in markdown
  assert "### Shape: Does it matter?" in markdown and "Seed report: It does." in markdown
  assert "a difference larger than the seeds' spread" in markdown
  assert "`collapse` ends at 0.3367" in markdown and ": unstable." in markdown
  assert "- Tier 1: " + ", ".join(f"`{name}`" for name in found["tiers"][0]) in markdown
  assert "3.00 (cpu, group of 3)" in markdown  # The group's epoch, and what it ran on.
  # Per-class accuracy: each class's share of its row on the diagonal, mean over seeds.
  matrices = [json.loads((lab / "worse" / f"seed_{s}" / "metrics.json").read_text())
              ["evaluation"]["final"]["confusion_matrix"] for s in range(3)]
  recall = np.mean([np.diag(m) / np.sum(m, 1) for m in np.asarray(matrices)], axis=0)
  assert rows["worse"]["confusion"]["class_accuracy"] == pytest.approx(recall.tolist())
  assert "| worse | " + " | ".join(f"{a:.3f}" for a in recall) + " |" in markdown
  # Shown: the baseline, the best, the failure (per seed: its seeds disagree); the rest folded.
  shown = {c["label"]: c for c in document["confusion_figures"]["shown"]}
  assert set(shown) == {"base", "same", "collapse"}
  assert shown["collapse"]["file"] == "confusion/collapse_seeds.png"
  assert [c["label"] for c in document["confusion_figures"]["others"]] == ["worse"]
  assert page.count("<details>") == 1 and "confusion matrix of worse" in page.split(
      "<details>")[1]
  for name in ("forest", "val_accuracy", "val_loss", "train_vs_validation"):
    assert (out / document["figures"][name]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

  # The small files alone (no checkpoints) rebuild the same report.
  (lab / "base" / "seed_0" / "checkpoints").mkdir()
  (lab / "base" / "seed_0" / "checkpoints" / "step_1.msgpack").write_bytes(b"weights")
  with pytest.raises(FileNotFoundError, match=f"--runs {tmp_path / 'nowhere'} is not a directory"):
    copy_small_files(tmp_path / "nowhere", tmp_path / "copy" / "runs")
  copied = copy_small_files(lab, tmp_path / "copy" / "runs")
  assert not list(copied.rglob("*.msgpack")) and (copied / "lab.json").is_file()
  build_report(copied, tmp_path / "copy")
  again = json.loads((tmp_path / "copy" / "report.json").read_text())
  for key in ("findings", "experiments", "class_accuracy", "runs"):
    assert again[key] == json.loads((out / "report.json").read_text())[key], key


def test_a_lab_with_no_completed_run_still_reports(tmp_path):
  lab = tmp_path / "lab"
  lab.mkdir()
  (lab / "lab.json").write_text(json.dumps({
      "lab": "empty", "source": "empty.py", "settings": {}, "experiments": ["a", "b"],
      "seeds": [0], "questions": [Question("Q", "?", "", (Compare("b", "a", "x"),)).to_json()],
      "runs": [{"path": "a/seed_0", "experiment": "a", "seed": 0, "dataset": "mnist",
                "status": "failed", "error": "it broke"},
               {"path": "b/seed_0", "experiment": "b", "seed": 0, "dataset": "mnist",
                "status": "running"}]}))
  document = build_report(lab, tmp_path / "out")
  markdown = (tmp_path / "out" / "report.md").read_text()
  assert "No run has completed" in markdown and "nothing to conclude" in markdown
  assert "`a/seed_0`: failed: it broke" in markdown
  assert document["figures"] == {}


@pytest.mark.slow  # Draws the committed report's figures again: about a minute.
def test_the_committed_lab02_report_rebuilds_from_the_repository(tmp_path):
  """docs/results/lab02_fashion_mnist/runs (the runs' small files) alone rebuild the committed
  report's numbers: every run's history and every experiment's statistics."""
  from conftest import ROOT
  committed = ROOT / "docs" / "results" / "lab02_fashion_mnist"
  build_report(committed / "runs", tmp_path / "report")
  saved = json.loads((committed / "report.json").read_text())
  rebuilt = json.loads((tmp_path / "report" / "report.json").read_text())
  assert len(rebuilt["runs"]) == len(saved["runs"]) == 56
  assert [r["history"] for r in rebuilt["runs"]] == [r["history"] for r in saved["runs"]]
  for key in ("final_val_accuracy", "last3_val_accuracy", "best_val_accuracy",
              "p_value_vs_baseline", "p_holm_vs_baseline"):
    assert [r[key] for r in rebuilt["experiments"]] == [r[key] for r in saved["experiments"]]
  assert rebuilt["findings"] == saved["findings"]


@pytest.mark.parametrize("effect,published", [(0.8, 26), (1.0, 17)])
def test_seeds_needed_is_the_published_two_sample_power(effect, published):
  """With equal spreads Welch's test has the two-sample t-test's degrees of freedom (2n - 2):
  80% power at a two-sided 0.05 for Cohen's d of 0.8 and 1.0 needs 26 and 17 per group, as
  G*Power and Cohen's tables give."""
  from jaxlab.report.stats import seeds_needed, welch_power
  spread = [-1.0, 0.0, 1.0]  # Sample standard deviation 1.
  a, b = [effect + x for x in spread], spread
  assert seeds_needed(a, b) == published
  assert welch_power(effect, 1, 1, published, 0.05) >= 0.8 > welch_power(
      effect, 1, 1, published - 1, 0.05)
  # Holm over 12 comparisons asks 0.05 / 12 of the first it rejects: more seeds.
  assert seeds_needed(a, b, tests=12) > published


def test_seeds_needed_at_the_extremes():
  from jaxlab.report.stats import PRACTICAL_SEEDS, seeds_needed
  assert seeds_needed([0.80, 0.82, 0.84], [0.84, 0.80, 0.82]) is None  # No difference.
  assert seeds_needed([0.80, 0.90, 0.70], [0.801, 0.899, 0.701]) is None  # Beyond 50.
  assert seeds_needed([0.90, 0.9001, 0.8999], [0.10, 0.1001, 0.0999]) == 2  # Huge.
  assert seeds_needed([0.9], [0.1, 0.2]) is None  # One seed: no spread to plan from.
  assert PRACTICAL_SEEDS == 50
  # Far in the noncentral t's lower tail SciPy's cdf is NaN, which would skip the right count.
  import itertools
  from jaxlab.report.stats import welch_power
  for gap, std, n in itertools.product((0.01, 0.1, 0.5, 2.0), (0.002, 0.02, 0.2),
                                       (2, 3, 5, 20)):
    power = welch_power(gap, std, std / 3, n, 0.05 / 12)
    assert 0 <= power <= 1, (gap, std, n, power)


def test_a_collapse_is_not_extrapolated_and_the_other_summary_is_told():
  """A spread that comes from collapsed runs gets no seed count but says so; a question on the
  mean of the last 3 epochs is answered on it, the final epoch's verdict told where it
  differs."""
  final = {"steady": [0.880, 0.882, 0.878], "collapses": [0.30, 0.86, 0.85],
           "noisy": [0.86, 0.90, 0.85]}
  best = {"steady": [0.885, 0.886, 0.880], "collapses": [0.84, 0.87, 0.86],
          "noisy": [0.90, 0.905, 0.90]}
  last3 = {"steady": [0.880, 0.882, 0.878], "collapses": [0.50, 0.86, 0.85],
           "noisy": [0.899, 0.901, 0.900]}
  evidence = findings.Evidence(final=final, best=best, seed_figure={}, seed_dataset={},
                               dataset={}, last3=last3)
  questions = [Question("Collapse", "?", compare=(Compare("collapses", "steady", "c"),)),
               Question("Noise", "?", compare=(Compare("noisy", "steady", "n"),),
                        metric="last3")]
  (collapse,), (noise,) = [a["comparisons"] for a in findings.answer(questions, evidence,
                                                                     "steady")]
  assert collapse["collapsed"] == {"collapses": 1} and collapse["seeds_needed"] is None
  assert "comes from collapsed runs (1 of its seeds" in findings.answer(
      questions, evidence, "steady")[0]["answer"][0]
  assert noise["metric"] == "last3" and noise["p_holm"] < 0.05  # Settled on the last 3 epochs.
  assert noise["other"]["metric"] == "final" and noise["other"]["p_holm"] >= 0.05
  sentence = findings.answer(questions, evidence, "steady")[1]["answer"][0]
  assert "On the final validation accuracy instead" in sentence and "inside the spread" in sentence
