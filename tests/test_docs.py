"""Every command and code block of the README and the guide runs here, so that no page can go
stale; and the flag reference is what the scripts' own flags say.

A page's blocks run in order, in one Python namespace, in this process (scripts through
`run_main`), with paths under `runs/` in a temporary folder and a small Fashion-MNIST where the
Debian package puts the real one. A comment before a block says how it runs, where it does
not run as it stands:

  <!-- test: SCRIPT ARGS; SCRIPT ARGS -->  each `python3 scripts/SCRIPT ...` of the block runs
                                          with ARGS after its own (fewer epochs and examples)
  <!-- test: ci -->                       the command CI runs: `.ci/run` holds it
  <!-- test: setup; ... -->               installing: its pip commands are `.ci/run`'s, apt-get
                                          and uv are not run here; its scripts run
  <!-- test: is FILE -->                  the page shows FILE, block by block: they are checked
                                          to be the file (which other blocks run)
  <!-- test: in PAGE -->                  each command of the block is one of PAGE's, and runs
                                          there (the README's tour shows the guide's commands)
  <!-- test: gpu -->, <!-- test: cluster -->  needs a GPU, or several machines: not run here
"""

import ast
import re
import shlex

import pytest

from jaxlab import data
from datafiles import synthetic_dataset, write_idx_arrays
from conftest import ROOT, run_main

PAGES = ["README.md", *sorted(p.relative_to(ROOT).as_posix()
                              for p in (ROOT / "docs" / "guide").glob("*.md"))]
BLOCK = re.compile(r"(?:<!-- test: (?P<marker>[^>]*?) -->\n)?```(?P<lang>sh|python)\n"
                   r"(?P<code>.*?)```", re.DOTALL)
NOT_RUN = ("gpu", "cluster")  # Needs what this machine has not.


def blocks(page):
  """(language, code, marker) of every code block of `page`."""
  return [(m["lang"], m["code"], (m["marker"] or "").strip())
          for m in BLOCK.finditer((ROOT / page).read_text())]


def commands(code):
  """The commands of a shell block: its lines (continuations joined), without comments, each
  split at `&&`."""
  lines = code.replace("\\\n", " ").splitlines()
  found = []
  for line in lines:
    line = line.split(" #", 1)[0].strip()
    if line and not line.startswith("#"):
      found += [c.strip() for c in line.split("&&")]
  return found


def script_args(marker):
  """{script: extra args} of a marker `SCRIPT ARGS; SCRIPT ARGS` (its other words: kinds)."""
  extra = {}
  for part in marker.split(";"):
    words = shlex.split(part)
    if words and words[0].endswith(".py"):
      extra[words[0]] = words[1:]
  return extra


def kinds(marker):
  return {part.split()[0] for part in marker.split(";") if part.split()} - {
      k for k in script_args(marker)}


def shown_from(marker):
  """The page of an `in PAGE` marker, or None."""
  found = [part.split()[1] for part in marker.split(";") if part.split()[:1] == ["in"]]
  return found[0] if found else None


def runnable_commands(page):
  """The commands of the page's shell blocks that run in its test."""
  return {command for lang, code, marker in blocks(page) if lang == "sh"
          and not kinds(marker) & set(NOT_RUN) and shown_from(marker) is None
          for command in commands(code)}


CI = (ROOT / ".ci" / "run").read_text()


def run_command(command, marker, tmp):
  """One command of a shell block, as its marker says."""
  words = shlex.split(command.replace("runs/", f"{tmp}/runs/"))
  if words[:2] == ["python3", "-m"] and words[2] in ("pip", "pytest"):
    assert kinds(marker) & {"ci", "setup"}, f"mark `{command}` as ci or setup"
    assert command in CI, f"{command!r} is not what .ci/run runs"
    return
  if words[0] in ("apt-get", "uv"):
    assert "setup" in kinds(marker), f"mark `{command}` as setup"
    return
  if shown_from(marker):
    assert command in runnable_commands(shown_from(marker)), (
        f"{command!r} is not a command that {shown_from(marker)} runs")
    return
  assert words[0] == "python3" and words[1].startswith("scripts/"), (
      f"a command the docs test cannot run: {command!r}; mark its block (see this module)")
  name = words[1][len("scripts/"):]
  done = run_main(name, *words[2:], *script_args(marker).get(name, []))
  assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"


def run_python(code, namespace, tmp, where):
  code = code.replace('"runs/', f'"{tmp}/runs/')
  exec(compile(code, where, "exec"), namespace)  # noqa: S102  The page's own code.


@pytest.fixture
def fashion_mnist(tmp_path, monkeypatch):
  """A small Fashion-MNIST (256 training images, 64 test) where the Debian package puts it."""
  folder = write_idx_arrays(tmp_path / "fashion-mnist",
                            synthetic_dataset("fashion_mnist", n_train=256, n_test=64))
  monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", folder)
  (tmp_path / "runs").mkdir()
  return tmp_path


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES)
def test_every_block_of_the_page_runs(page, fashion_mnist):
  tmp, namespace, shown = fashion_mnist, {"__name__": "__docs__"}, {}
  for i, (lang, code, marker) in enumerate(blocks(page)):
    where = f"{page}, block {i + 1}"
    if kinds(marker) & set(NOT_RUN):
      continue
    if marker.startswith("is "):
      shown.setdefault(marker[3:].strip(), []).append(code)
    elif lang == "python":
      run_python(code, namespace, tmp, where)
    else:
      for command in commands(code):
        run_command(command, marker, tmp)
  for file, parts in shown.items():  # The page's blocks are the file, after its docstring.
    joined = "\n\n\n".join(part.rstrip("\n") for part in parts) + "\n"
    text = (ROOT / file).read_text()
    assert text.endswith(joined), f"{page}'s blocks are not {file}"
    (docstring,) = ast.parse(text[:len(text) - len(joined)]).body
    assert isinstance(docstring.value, ast.Constant)


def test_every_page_of_the_guide_is_one_click_from_the_readme():
  readme = (ROOT / "README.md").read_text()
  linked = set(re.findall(r"\]\((docs/guide/[^)#]+)", readme))
  assert linked == set(PAGES[1:])
  assert len(readme.splitlines()) <= 200


def test_the_flag_reference_is_the_scripts_own():
  """docs/guide/flags.md is what `scripts/flag_reference.py` writes from absl's own flag help:
  a flag added, removed or reworded without it fails here."""
  from jaxlab.cli import flag_reference
  expected = flag_reference(sorted((ROOT / "scripts").glob("*.py")))
  assert (ROOT / "docs" / "guide" / "flags.md").read_text() == expected, (
      "docs/guide/flags.md is out of date: run python3 scripts/flag_reference.py")
