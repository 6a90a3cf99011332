"""The package tree is the architecture: no import circles, and the method at the
ground floor.

Imports are read from the source (``ast``), function-level ones included, for
every module of ``astra_jax``, ``infer``, ``train`` and ``configs``:

  - no module imports one that imports it back, directly or through others;
  - ``astra_jax.core`` (the method: quantizer, exchange, attention, syncs)
    imports no other ``astra_jax`` subpackage;
  - ``astra_jax.models`` imports only ``astra_jax.core``: model code knows no
    meshes, runners, readers or run-time.
"""

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("astra_jax", "infer", "train", "configs")


def _modules() -> dict[str, pathlib.Path]:
  found = {}
  for package in PACKAGES:
    for path in (ROOT / package).rglob("*.py"):
      parts = path.relative_to(ROOT).with_suffix("").parts
      name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
      found[name] = path
  return found


MODULES = _modules()


def _resolve(name: str) -> str | None:
  """The longest known module that ``name`` starts with (a.b.c -> a.b if c is a symbol)."""
  while name:
    if name in MODULES:
      return name
    name = name.rpartition(".")[0]
  return None


def _imports(module: str) -> set[str]:
  path = MODULES[module]
  package = module if path.name == "__init__.py" else module.rpartition(".")[0]
  targets = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
      names = [f"{base}.{alias.name}" for alias in node.names] + [base]
    else:
      continue
    for name in names:
      target = _resolve(name)
      if target and target != module and not module.startswith(f"{target}."):
        targets.add(target)  # a package's own __init__ is not an import edge of its modules
  return targets


GRAPH = {module: _imports(module) for module in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_the_reader_sees_the_tree():
  assert "astra_jax.core.exchange" in MODULES and "astra_jax.parallel.apply" in MODULES
  assert "astra_jax.parallel.apply" in GRAPH["astra_jax.parallel.tensor_apply"]
  assert "astra_jax.core.sync" in GRAPH["astra_jax.models.gpt2"]


def test_cycle_finder_finds_a_planted_circle():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
  assert _cycles(graph) == [["a", "b", "c"]]
  assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle():
  cycles = _cycles(GRAPH)
  assert not cycles, f"import circles (each a set of modules importing each other): {cycles}"


@pytest.mark.parametrize("layer, allowed", [
    ("astra_jax.core", ("astra_jax.core",)),
    ("astra_jax.models", ("astra_jax.core", "astra_jax.models")),
    ("astra_jax.diffusion", ("astra_jax.core", "astra_jax.diffusion", "astra_jax.parallel")),
])
def test_layer_imports_only_below_it(layer, allowed):
  bad = {m: sorted(t for t in targets if t.startswith("astra_jax")
                   and not any(t == a or t.startswith(f"{a}.") for a in allowed)
                   and t != "astra_jax")
         for m, targets in GRAPH.items() if m == layer or m.startswith(f"{layer}.")}
  bad = {m: t for m, t in bad.items() if t}
  assert not bad, f"{layer} may import only {allowed}; found {bad}"


def test_command_line_modules_import_no_jax():
  """Every ``python -m`` entry point can still choose its device count after
  being imported: XLA:CPU fixes it when jax starts, so a CLI module that
  imports jax at module level makes ``--mesh=4`` find one device."""
  root = pathlib.Path(__file__).resolve().parents[1]
  modules = sorted(".".join(p.relative_to(root).with_suffix("").parts)
                   for folder in ("infer", "infer/lab", "train")
                   for p in (root / folder).glob("*.py") if p.stem != "__init__")
  probe = ("import importlib, sys\n"
           f"for name in {modules!r}:\n"
           "  importlib.import_module(name)\n"
           "  if 'jax' in sys.modules:\n"
           "    print(name); break\n")
  proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                        cwd=root, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip() == "", f"{proc.stdout.strip()} imports jax when imported"
