"""Labs: declarations loaded by name or from a user's file, and whole labs run, killed, resumed
and reported, as a user runs them (scripts/run_lab.py, scripts/report.py)."""

import json
import math
import re
import shutil
import signal
import statistics
import subprocess
import textwrap
import warnings

import numpy as np
import pytest
from scipy import stats

from jaxlab.experiment import load_lab
from jaxlab.lab.runner import LabRunner, plan_lab
from jaxlab.report import build_report
from datafiles import write_idx_dataset
from conftest import run_main, start_script

TINY_LAB = """
from jaxlab.experiment import Experiment, register
from jaxlab.models import MLP, Dense

register(Experiment(name="{a}", dataset="mnist", epochs=2, batch_size=32,
                    model=MLP(layers=(Dense(32, "relu", batch_norm=True, dropout=0.2),))))
register(Experiment(name="{b}", dataset="{b_dataset}", epochs=2, batch_size=32,
                    model=MLP(layers=(Dense(16, "relu"), Dense(16, "relu", batch_norm=True)))))

from jaxlab.report.findings import Compare, Question
QUESTIONS = [Question("Width", "Does {b} differ?", "it did",
                      (Compare("{b}", "{a}", "two layers of 16"),))]
"""


def write_lab(path, a, b, b_dataset="mnist"):
  path.write_text(textwrap.dedent(TINY_LAB.format(a=a, b=b, b_dataset=b_dataset)))
  return path


def test_builtin_labs_split_the_catalog():
  names = {lab: load_lab(lab).experiments for lab in ("lab02", "lab04_alexnet", "lab04_vgg")}
  assert len(names["lab02"]) == 14 and names["lab02"][0] == "mlp_baseline"
  assert names["lab04_alexnet"][0] == "alexnet" and len(names["lab04_alexnet"]) == 6
  assert names["lab04_vgg"][:2] == ("vgg_fashion_mnist", "vgg_cifar10")
  assert len(names["lab04_vgg"]) == 7


def test_user_lab_file(tmp_path):
  lab = load_lab(str(write_lab(tmp_path / "my_lab.py", "user_lab_a", "user_lab_b")))
  assert (lab.name, lab.experiments) == ("my_lab", ("user_lab_a", "user_lab_b"))
  assert [(q.topic, q.compare[0].experiment) for q in lab.questions] == [("Width", "user_lab_b")]
  assert load_lab(str(tmp_path / "my_lab.py")) is lab  # Loaded once per process.
  runs = plan_lab(lab, tmp_path / "lab", None, [0, 3], {"epochs": 1})
  assert [(r.experiment, r.seed, r.config.epochs) for r in runs] == [
      ("user_lab_a", 0, 1), ("user_lab_a", 3, 1), ("user_lab_b", 0, 1), ("user_lab_b", 3, 1)]


def test_a_taken_name_fails_naming_both_files(tmp_path):
  path = write_lab(tmp_path / "clash.py", "user_clash_a", "mlp_baseline")
  with pytest.raises(ValueError, match=r"experiment name 'mlp_baseline' declared in .*clash\.py "
                     r"is already taken \(declared in .*experiments/lab02\.py\)"):
    load_lab(str(path))


@pytest.mark.parametrize("spec,error,match", [
    ("lab99", LookupError, "unknown lab 'lab99'; known labs: lab02, lab04_alexnet, lab04_vgg"),
    ("nowhere/lab.py", FileNotFoundError, "lab file nowhere/lab.py does not exist"),
])
def test_unknown_labs(spec, error, match):
  with pytest.raises(error, match=match):
    load_lab(spec)


@pytest.mark.parametrize("source,line,message", [
    ("from jaxlab.experiment import register\n\nregister(Experiment(name='x'\n", 3,
     "SyntaxError: '(' was never closed"),
    ("import math\nX = 1\nY = math.sqrt(-1)\n", 3, "ValueError: math domain error"),
    ("from jaxlab.models import Dense\nZ = Dense(32, 'relu', nonsense=1)\n", 2,
     "TypeError: Dense.__init__() got an unexpected keyword argument 'nonsense'"),
])
def test_a_lab_file_that_fails_is_one_error_line_naming_file_and_line(tmp_path, source, line,
                                                                       message):
  lab = tmp_path / "broken_lab.py"
  lab.write_text(source)
  for name, args in (("run_lab.py", [f"--lab={lab}", f"--workdir={tmp_path / 'lab'}"]),
                     ("train.py", [f"--lab={lab}", "--experiment=mlp_baseline",
                                   f"--workdir={tmp_path / 'run'}"])):
    result = run_main(name, *args)
    errors = [l for l in result.stderr.splitlines() if l.startswith("error: ")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr
    assert errors[0] == f"error: lab file {lab}, line {line}: {message}", errors[0]
  assert not (tmp_path / "lab").exists() and not (tmp_path / "run").exists()


def test_a_bug_of_jaxlabs_under_a_lab_file_keeps_its_traceback(tmp_path, monkeypatch):
  """A lab file's own fault is one error line naming its line; an exception raised inside
  jaxlab's code that the file calls is a bug, and is not dressed as the file's."""
  from jaxlab import experiment

  def broken(name, item):
    raise KeyError("per_class")  # A bug of the registry's, standing in for any.
  monkeypatch.setattr(experiment.EXPERIMENTS, "register", broken)
  path = write_lab(tmp_path / "fine_lab.py", "user_bug_a", "user_bug_b")
  with pytest.raises(KeyError, match="per_class"):
    load_lab(str(path))
  result = run_main("run_lab.py", f"--lab={path}", f"--workdir={tmp_path / 'lab'}")
  assert result.returncode == 1 and "Traceback (most recent call last)" in result.stderr
  assert not [l for l in result.stderr.splitlines() if l.startswith("error:")]


def test_a_file_without_experiments_is_not_a_lab(tmp_path):
  (tmp_path / "empty_lab.py").write_text("X = 1\n")
  with pytest.raises(ValueError, match="declares no experiments"):
    load_lab(str(tmp_path / "empty_lab.py"))


def test_bad_plans_fail_before_training():
  lab = load_lab("lab02")
  with pytest.raises(ValueError, match="experiment 'alexnet' is not in lab lab02; its "
                     "experiments: mlp_baseline, mlp_deep"):
    plan_lab(lab, "lab", ["mlp_baseline", "alexnet"], [0], {})
  with pytest.raises(ValueError, match="each experiment and seed may be given once"):
    plan_lab(lab, "lab", None, [1, 1], {})
  with pytest.raises(ValueError, match="learning_rate must be a positive number, got -1.0"):
    plan_lab(lab, "lab", None, [0], {"learning_rate": -1.0})


def run_lab_args(lab_file, workdir, data, *extra):
  return ["--lab=" + str(lab_file), f"--workdir={workdir}", f"--data_dir={data}", "--seeds=0,1",
          "--steps_per_dispatch=2", "--eval_batch_size=32", *extra]


def lab_status(workdir):
  return {r["path"]: r["status"] for r in json.loads((workdir / "lab.json").read_text())["runs"]}


def kill_when(args, line_start, timeout=240, sig=signal.SIGKILL):
  """Starts run_lab.py and sends `sig` as soon as it prints a line starting with `line_start`;
  returns what it wrote to stderr."""
  process = start_script("run_lab.py", *args, stdout=subprocess.DEVNULL)
  seen = []
  try:
    for line in process.stderr:
      seen.append(line)
      if line.startswith(line_start):
        process.send_signal(sig)
        break
    seen += process.stderr.readlines()
  finally:
    process.wait(timeout=timeout)
  expected = -signal.SIGKILL if sig == signal.SIGKILL else 75
  assert process.returncode == expected, "".join(seen[-20:])
  return "".join(seen)


def tiny_lab(tmp_path, name, a, b):
  """A lab file of two experiments, its data, and the run_lab.py arguments for two seeds."""
  data = tmp_path / "data"
  write_idx_dataset(data, n_train=160, n_test=48)
  workdir = tmp_path / "lab"
  return data, workdir, run_lab_args(write_lab(tmp_path / f"{name}.py", a, b), workdir, data)


@pytest.mark.slow
def test_lab_killed_resumed_and_reported(tmp_path):
  data, workdir, args = tiny_lab(tmp_path, "two", "lab_test_bn_dropout", "lab_test_plain")
  # Killed as the second experiment's group (runs 3 and 4) starts compiling.
  kill_when(args, "[two] runs 3-4/4: lab_test_plain seeds 0,1 ->")
  status = lab_status(workdir)
  assert status == {"lab_test_bn_dropout/seed_0": "completed",
                    "lab_test_bn_dropout/seed_1": "completed",
                    "lab_test_plain/seed_0": "running", "lab_test_plain/seed_1": "running"}
  # A partial lab reports every run: completed ones in the numbers, the others listed. (A run
  # that the lab never reached is pending in lab.json, and missing in the report.)
  lab_json = json.loads((workdir / "lab.json").read_text())
  lab_json["runs"][3]["status"] = "pending"
  (workdir / "lab.json").write_text(json.dumps(lab_json))
  shutil.rmtree(workdir / "lab_test_plain" / "seed_1", ignore_errors=True)
  partial = build_report(workdir, tmp_path / "partial")
  assert {r["path"]: r["status"] for r in partial["runs"]} == {
      "lab_test_bn_dropout/seed_0": "completed", "lab_test_bn_dropout/seed_1": "completed",
      "lab_test_plain/seed_0": "running", "lab_test_plain/seed_1": "missing"}
  assert partial["experiments"][1]["final_val_accuracy"]["n"] == 0
  partial_md = (tmp_path / "partial" / "report.md").read_text()
  assert "`lab_test_plain/seed_1`: missing" in partial_md
  assert "`lab_test_plain/seed_0`: running" in partial_md
  finished = (workdir / "lab_test_bn_dropout" / "seed_0" / "metrics.jsonl").read_bytes()

  rerun = run_main("run_lab.py", *args)  # Resumed in this process.
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "run 1/4: lab_test_bn_dropout seed 0: finished earlier, skipped" in rerun.stderr
  assert "runs 3-4/4: lab_test_plain seeds 0,1 ->" in rerun.stderr
  assert set(lab_status(workdir).values()) == {"completed"}
  assert (workdir / "lab_test_bn_dropout" / "seed_0" / "metrics.jsonl").read_bytes() == finished
  summaries = {}
  for experiment in ("lab_test_bn_dropout", "lab_test_plain"):
    for seed in (0, 1):
      run = workdir / experiment / f"seed_{seed}"
      lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
      assert [l["epoch"] for l in lines] == [1, 2]
      assert json.loads((run / "config.json").read_text())["config"]["seed"] == seed
      summaries[experiment, seed] = json.loads((run / "metrics.json").read_text())
  assert "| lab_test_plain | mnist |" in rerun.stdout  # The results table at the end.

  out = tmp_path / "report"
  assert run_main("report.py", f"--runs={workdir}", f"--out={out}").returncode == 0
  document = json.loads((out / "report.json").read_text())
  assert [row["experiment"] for row in document["experiments"]] == ["lab_test_bn_dropout",
                                                                     "lab_test_plain"]
  markdown = (out / "report.md").read_text()
  # The lab's question, recorded in lab.json, answered in the report.
  (question,) = document["findings"]["questions"]
  assert question["comparisons"][0]["against"] == "lab_test_bn_dropout"
  assert "### Width: Does lab_test_plain differ?" in markdown
  assert "`lab_test_plain` (two layers of 16) ends " in markdown
  for row in document["experiments"]:
    mine = [summaries[row["experiment"], seed] for seed in (0, 1)]
    assert row["seeds"] == [0, 1] and row["epochs"] == 2
    assert row["params"] == mine[0]["total_params"]
    for key in ("final_val_accuracy", "best_val_accuracy"):
      values = [m[key] for m in mine]
      assert row[key]["per_seed"] == {"0": values[0], "1": values[1]}
      assert row[key]["mean"] == pytest.approx(statistics.fmean(values), abs=1e-15)
      assert row[key]["std"] == pytest.approx(statistics.stdev(values), abs=1e-15)
      cell = f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"
      if key == "final_val_accuracy":  # With the mean's 95% t interval.
        half = stats.t.ppf(0.975, 1) * statistics.stdev(values) / math.sqrt(2)
        mean = statistics.fmean(values)
        cell += f" [{mean - half:.3f}, {mean + half:.3f}]"
      assert cell + " (n=2)" in next(l for l in markdown.splitlines()
                                     if l.startswith(f"| {row['experiment']} |")), cell
    matrices = [m["evaluation"]["final"]["confusion_matrix"] for m in mine]
    np.testing.assert_allclose(row["confusion"]["matrix"], np.mean(matrices, axis=0))
    assert (out / row["confusion"]["file"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  base = [summaries["lab_test_bn_dropout", s]["final_val_accuracy"] for s in (0, 1)]
  other = [summaries["lab_test_plain", s]["final_val_accuracy"] for s in (0, 1)]
  with warnings.catch_warnings():  # SciPy warns of samples alike; its NaN is then expected
    warnings.simplefilter("ignore", RuntimeWarning)
    expected_p = stats.ttest_ind(other, base, equal_var=False).pvalue
  p = document["experiments"][1]["p_value_vs_baseline"]
  assert (p is None and np.isnan(expected_p)) or p == pytest.approx(expected_p)
  for name in ("forest", "val_accuracy", "val_loss", "train_vs_validation"):
    assert document["figures"][name] == f"{name}.png"
    assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert document["samples"] == [{"dataset": "mnist", "file": "samples_mnist.png",
                                  "source": "IDX files"}]
  assert (out / "samples_mnist.png").stat().st_size > 1000
  page = (out / "report.html").read_text()
  images = markdown.count("](")
  # Curves 3, forest 1, samples 1, confusion matrices 2 (the baseline and the best: no others).
  assert page.count("<img src='data:image/png;base64,") == images == 4 + 1 + 2
  assert "src='http" not in page and "href=" not in page
  # --with_runs: the runs' small files copied beside the report, which is built from them.
  alone = tmp_path / "alone"
  assert run_main("report.py", f"--runs={workdir}", f"--out={alone}", "--with_runs"
                  ).returncode == 0
  copied = sorted(p.relative_to(alone / "runs").as_posix()
                  for p in (alone / "runs").rglob("*") if p.is_file())
  assert copied == ["lab.json"] + [f"{e}/seed_{s}/{f}" for e in ("lab_test_bn_dropout",
                                                                   "lab_test_plain")
                                   for s in (0, 1)
                                   for f in ("config.json", "metrics.json", "metrics.jsonl")]
  rebuilt = json.loads((alone / "report.json").read_text())
  assert rebuilt["runs_dir"] == "runs"
  assert [r["history"] for r in rebuilt["runs"]] == [r["history"] for r in document["runs"]]


@pytest.mark.slow
def test_sigterm_stops_the_lab_after_a_checkpoint(tmp_path):
  _, workdir, args = tiny_lab(tmp_path, "term", "lab_term_a", "lab_term_b")
  stderr = kill_when(args, "[term] runs 3-4/4: lab_term_b seeds 0,1 ->", sig=signal.SIGTERM)
  assert "SIGTERM: stopping at the next step boundary" in stderr
  step = int(re.search(r"\[term\] runs 3-4/4: lab_term_b seeds 0,1: stopped in epoch 1 after "
                       r"step (\d) of 5 \(global step \1\)", stderr).group(1))
  assert "resume with the same command: python3 " in stderr
  for seed in (0, 1):
    assert lab_status(workdir)[f"lab_term_b/seed_{seed}"] == "running"
    assert (workdir / "lab_term_b" / f"seed_{seed}" / "checkpoints"
            / f"step_{step:09d}.msgpack").is_file()
  resumed = run_main("run_lab.py", *args)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  for seed in (0, 1):
    assert (f"Resuming {workdir / 'lab_term_b' / f'seed_{seed}'} from step {step}"
            in resumed.stderr)
  assert set(lab_status(workdir).values()) == {"completed"}


@pytest.mark.slow
def test_a_failing_run_beside_a_passing_one(tmp_path):
  data = tmp_path / "data"
  write_idx_dataset(data, n_train=64, n_test=32)
  lab_file = write_lab(tmp_path / "half.py", "lab_test_ok", "lab_test_no_data",
                       b_dataset="cifar10")
  workdir = tmp_path / "lab"
  result = run_main("run_lab.py", *run_lab_args(lab_file, workdir, data, "--seeds=0"))
  assert result.returncode == 1, result.stderr
  runs = {r["path"]: r for r in json.loads((workdir / "lab.json").read_text())["runs"]}
  assert runs["lab_test_ok/seed_0"]["status"] == "completed"
  failed = runs["lab_test_no_data/seed_0"]
  assert failed["status"] == "failed"
  assert failed["error"].startswith("data set 'cifar10' was not found")
  assert "\n" not in failed["error"]
  assert "failed: lab_test_no_data/seed_0: data set 'cifar10' was not found" in result.stdout
  document = build_report(workdir, tmp_path / "report")
  assert {r["path"]: r["status"] for r in document["runs"]} == {
      "lab_test_ok/seed_0": "completed", "lab_test_no_data/seed_0": "failed"}
  # The lab directory refuses other settings, naming them; more epochs are allowed.
  lab = load_lab(str(lab_file))
  settings = json.loads((workdir / "lab.json").read_text())["settings"]
  with pytest.raises(ValueError, match=r"holds lab half with other settings \(batch_size: None "
                     r"-> 16\)"):
    LabRunner(lab, workdir, plan_lab(lab, workdir, None, [0], {}),
              {**settings, "batch_size": 16})
  LabRunner(lab, workdir, plan_lab(lab, workdir, None, [0], {}), {**settings, "epochs": 3})
  assert "`lab_test_no_data/seed_0`: failed: data set 'cifar10' was not found" in (
      tmp_path / "report" / "report.md").read_text()
  # A lab.json cut short (its runs intact) is rebuilt from the run directories, with a warning:
  # a run of the lab that this command does not name keeps its record, from its own files.
  text = (workdir / "lab.json").read_text()
  (workdir / "lab.json").write_text(text[:len(text) // 3])
  again = run_main("run_lab.py", *run_lab_args(lab_file, workdir, data, "--seeds=0",
                                               "--experiments=lab_test_no_data"))
  assert again.returncode == 1, again.stderr
  warnings = [l for l in again.stderr.splitlines() if l.startswith("warning: ")]
  assert len(warnings) == 1 and warnings[0].startswith(f"warning: {workdir / 'lab.json'} cannot "
                                                       "be read (")
  assert "rebuilding it from the run directories" in warnings[0]
  rebuilt = {r["path"]: r for r in json.loads((workdir / "lab.json").read_text())["runs"]}
  assert rebuilt["lab_test_ok/seed_0"]["status"] == "completed"
  assert rebuilt["lab_test_ok/seed_0"]["final_val_accuracy"] == runs["lab_test_ok/seed_0"][
      "final_val_accuracy"]
  assert rebuilt["lab_test_no_data/seed_0"]["status"] == "failed"


def test_run_lab_bad_input(tmp_path):
  """Each a one-line error and status 2, in this process (run_lab.py's main, as its command
  line would run it; as a process, bad input and all: tests/test_scripts.py)."""
  (tmp_path / "file.txt").write_text("x")
  cases = [
      (["--lab=lab77", f"--workdir={tmp_path}/w"], "unknown lab 'lab77'"),
      (["--lab=lab02", f"--workdir={tmp_path}/w", "--seeds=0,x"], "--seeds must be integers"),
      (["--lab=lab02", f"--workdir={tmp_path}/w", "--epochs=0"],
       "epochs must be a positive integer"),
      (["--lab=lab02", f"--workdir={tmp_path}/w", "--experiments=mlp_baseline,vgg_cifar10"],
       "experiment 'vgg_cifar10' is not in lab lab02"),
      (["--lab=lab02", f"--workdir={tmp_path}/file.txt"], "is a file, not a directory"),
  ]
  results = [run_main("run_lab.py", *args) for args, _ in cases]
  for (args, message), result in zip(cases, results):
    errors = [l for l in result.stderr.splitlines() if l.startswith("error: ")]
    assert result.returncode == 2 and len(errors) == 1 and message in errors[0], (args,
                                                                                   result.stderr)
    assert "Traceback" not in result.stderr


SETTLING_LAB = """
from jaxlab.experiment import Experiment, register
from jaxlab.models import MLP, Dense
from jaxlab.report.findings import Compare, Question

# A learning rate that cannot train (1e-7: chance accuracy) against one that can, and a twin of
# the one that can, one unit wider: no difference seeds could show.
register(Experiment(name="settle_good", dataset="mnist", epochs=3, batch_size=32,
                    model=MLP(layers=(Dense(64, "relu", batch_norm=False),))))
register(Experiment(name="settle_bad", dataset="mnist", epochs=3, batch_size=32,
                    learning_rate=1e-7, model=MLP(layers=(Dense(64, "relu", batch_norm=False),))))
register(Experiment(name="settle_twin", dataset="mnist", epochs=3, batch_size=32,
                    model=MLP(layers=(Dense(65, "relu", batch_norm=False),))))
QUESTIONS = [Question("Rate", "Does a learning rate of 1e-7 train?", "",
                      (Compare("settle_bad", "settle_good", "learning rate 1e-7"),)),
             Question("Width", "Does one more unit matter?", "",
                      (Compare("settle_twin", "settle_good", "65 units, not 64"),))]
"""


@pytest.mark.slow
def test_until_settled_adds_seeds_only_where_they_can_settle_and_resumes_a_killed_round(
    tmp_path):
  """One seed declared, six at most: every comparison first gets its second seed (a round,
  recorded before it trains); the one with a real difference is then settled, the one without
  stays open, its reason said, never past the budget. Killed inside its first round, the lab
  resumes that round."""
  from datafiles import synthetic_dataset, write_idx_arrays
  data = write_idx_arrays(tmp_path / "data", synthetic_dataset(n_train=320, n_test=64))
  (tmp_path / "settle_lab.py").write_text(SETTLING_LAB)
  workdir = tmp_path / "lab"
  args = [f"--lab={tmp_path / 'settle_lab.py'}", f"--workdir={workdir}", f"--data_dir={data}",
          "--seeds=0", "--until_settled", "--max_seeds=6", "--steps_per_dispatch=5",
          "--eval_batch_size=64"]
  killed = kill_when(args, "[settle_lab] round 1: adding seeds")
  assert "settle_good 1" in killed and "settle_bad 1" in killed and "settle_twin 1" in killed
  rounds = json.loads((workdir / "lab.json").read_text())["rounds"]
  assert [(r["round"], r["status"]) for r in rounds] == [(1, "running")]
  assert rounds[0]["added"] == {"settle_bad": [1], "settle_good": [1], "settle_twin": [1]}
  assert {w["comparison"] for w in rounds[0]["why"]} == {"settle_bad - settle_good",
                                                         "settle_twin - settle_good"}
  resumed = run_main("run_lab.py", *args)  # The same command: the round goes on.
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  record = json.loads((workdir / "lab.json").read_text())
  rounds = record["rounds"]
  assert rounds[0]["status"] == "done" and "round 1: adding seeds" in resumed.stderr
  assert all(r["status"] == "done" for r in rounds)
  standing = {s["comparison"]: s for s in record["settled"]}
  bad = standing["settle_bad - settle_good"]
  assert bad["settled"] and bad["why"] == "settled" and bad["seeds"][0] >= 2
  twin = standing["settle_twin - settle_good"]
  assert not twin["settled"] and twin["why"].startswith("open: ")
  assert max(twin["seeds"]) <= 6
  # Every added run trained once, an ordinary run directory; nothing past the budget.
  for name in ("settle_good", "settle_bad", "settle_twin"):
    seeds = sorted(int(p.name[5:]) for p in (workdir / name).glob("seed_*"))
    assert seeds == list(range(len(seeds))) and 2 <= len(seeds) <= 6, (name, seeds)
    for seed in seeds:
      lines = (workdir / name / f"seed_{seed}" / "metrics.jsonl").read_text().splitlines()
      assert [json.loads(l)["epoch"] for l in lines] == [1, 2, 3]
  assert f"{len(rounds)} round(s) of added seeds" in resumed.stdout
  assert "settle_bad - settle_good" in resumed.stdout and "settled" in resumed.stdout
  # The report says which comparisons the added seeds settled and which stayed open, and why.
  document = build_report(workdir, tmp_path / "report")
  assert document["labs"][0]["rounds"] == rounds
  markdown = (tmp_path / "report" / "report.md").read_text()
  assert "### Seeds added until the questions settle" in markdown
  assert "Round 1 (done): seeds 1 to `settle_bad`" in markdown
  assert "`settle_bad - settle_good` (" in markdown and "settled by the added seeds" in markdown
  assert f"`settle_twin - settle_good` ({'/'.join(map(str, twin['seeds']))} seeds): open: " in \
      markdown


def test_until_settled_stops_when_the_seeds_it_adds_fail(tmp_path):
  """Runs that fail before they write anything (no data here) are still seeds taken: a round
  whose runs all fail is the last, and the comparisons say why they stay open."""
  (tmp_path / "empty").mkdir()
  result = run_main("run_lab.py", "--lab=lab02", f"--workdir={tmp_path / 'lab'}",
                    "--experiments=mlp_deep,mlp_baseline", "--seeds=0", "--epochs=1",
                    "--dataset=cifar10", f"--data_dir={tmp_path / 'empty'}", "--until_settled",
                    "--max_seeds=6")
  assert result.returncode == 1, result.stderr[-2000:]
  record = json.loads((tmp_path / "lab" / "lab.json").read_text())
  assert [(r["round"], r["added"], r["completed"]) for r in record["rounds"]] == [
      (1, {"mlp_deep": [1], "mlp_baseline": [1]}, 0)]
  (standing,) = record["settled"]
  assert standing["comparison"] == "mlp_deep - mlp_baseline" and not standing["settled"]
  assert standing["why"].startswith("open: the runs of the seeds it asked for failed")
  assert {(r["experiment"], r["seed"], r["status"]) for r in record["runs"]} == {
      (e, s, "failed") for e in ("mlp_deep", "mlp_baseline") for s in (0, 1)}
