"""The library's layout: the README's table says what each module's docstring says, and every
module looks only down (no import cycle, no library module importing the command line)."""

import ast
import json
import pathlib
import re
import subprocess
import sys

import pytest

from conftest import ROOT

MODULES = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "jaxlab").rglob("*.py"))


def first_docstring_line(path):
  return ast.get_docstring(ast.parse((ROOT / path).read_text())).split("\n")[0]


def readme_layout():
  """{path: description} of the README's layout tables' rows of one module each: a table per
  folder (`### `FOLDER`: ...`), a row per module of it."""
  section = (ROOT / "README.md").read_text().split("## Layout\n", 1)[1].split("\n## ", 1)[0]
  rows = {}
  for folder, table in re.findall(r"^### `([^`]+/)`[^\n]*\n(.*?)(?=^### |\Z)", section,
                                  re.MULTILINE | re.DOTALL):
    for module, description in re.findall(r"^\| `([^`/]+\.py)` \| (.+) \|$", table,
                                          re.MULTILINE):
      rows[folder + module] = description
  return rows


def test_the_readme_table_is_each_modules_first_docstring_line():
  table = readme_layout()
  listed = set(table)
  assert listed | {"jaxlab/__init__.py"} == set(MODULES)
  # At most 12 modules at the top of the package (its __init__ included); the rest in folders
  # by role.
  assert len([m for m in MODULES if m.count("/") == 1]) <= 12
  for path in sorted(listed):
    assert table[path] == first_docstring_line(path), path


def imports(path):
  """The jaxlab modules `path` imports, at its top or inside functions."""
  tree = ast.parse((ROOT / path).read_text())
  package = ".".join(pathlib.PurePosixPath(path).with_suffix("").parts[:-1])
  names = {p[:-3].replace("/", ".").removesuffix(".__init__") for p in MODULES}
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                        + ([base] if base else []))
      # `from package import module` depends on the module; `from module import name` on it.
      submodules = {f"{base}.{a.name}" for a in node.names} & names
      found |= submodules or {base}
  return {n for n in found if n in names}


def assert_no_cycle(graph):
  """Every node of `graph` ({node: what it imports}) can be placed above everything it imports."""
  placed, remaining = set(), dict(graph)
  while remaining:
    ready = [m for m, deps in remaining.items() if deps - {m} <= placed]
    assert ready, f"import cycle among {sorted(remaining)}"
    placed |= set(ready)
    for m in ready:
      del remaining[m]


def test_modules_look_only_down():
  graph = {p[:-3].replace("/", ".").removesuffix(".__init__"): imports(p) for p in MODULES}
  assert not [m for m, deps in graph.items() if "jaxlab.cli" in deps], "jaxlab.cli is for scripts"
  assert_no_cycle(graph)
  # Nor do the rooms of the package (a module at its top, or a folder): no folder imports a
  # module that imports the folder back.
  room = lambda module: ".".join(module.split(".")[:2])
  rooms = {}
  for module, deps in graph.items():
    rooms.setdefault(room(module), set()).update(room(d) for d in deps)
  assert_no_cycle(rooms)


# What must not import JAX: the readers of run directories (a report is built anywhere the
# files are), and jaxlab.training.kernels, which runs before JAX starts. The report's modules are
# named one by one: the package itself imports them lazily.
JAX_FREE = ["jaxlab.errors", "jaxlab.files", "jaxlab.config", "jaxlab.rundir.run",
            "jaxlab.training.kernels", "jaxlab.report", "jaxlab.report.stats", "jaxlab.report.findings",
            "jaxlab.report.runs", "jaxlab.report.render", "jaxlab.report.figures",
            "jaxlab.report.build"]
TRAINING = ("jax", "flax", "optax")


@pytest.fixture(scope="module")
def imported():
  """For each of JAX_FREE, imported in turn in one fresh process: the modules of JAX, Flax and
  optax that were loaded after it (and not before: the first module to pull JAX in is named)."""
  code = ("import importlib, json, sys\n"
          "found = {}\n"
          f"for name in {JAX_FREE!r}:\n"
          "  importlib.import_module(name)\n"
          f"  found[name] = sorted(m for m in sys.modules if m.split('.')[0] in {TRAINING!r})\n"
          "print(json.dumps(found))\n")
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  return json.loads(result.stdout)


@pytest.mark.slow
@pytest.mark.parametrize("module", JAX_FREE)
def test_modules_that_read_run_directories_import_no_jax(imported, module):
  assert imported[module] == [], f"importing {module} loaded {imported[module][:5]}"
