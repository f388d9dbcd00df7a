"""The layers import downwards only: pallas_kernels <- nanoflow_jax <- launch <- lab, and no module takes part
in an import circle (imports inside functions count too: they are circles waiting for the first caller)."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = ["pallas_kernels", "nanoflow_jax", "checkpoints", "launch", "lab"]   # lowest first
RANK = {"pallas_kernels": 0, "nanoflow_jax": 1, "checkpoints": 2, "launch": 2, "lab": 3}


def _modules():
  for top in LAYERS:
    for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
      for f in files:
        if f.endswith(".py"):
          path = os.path.join(dirpath, f)
          mod = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
          yield mod.removesuffix(".__init__"), path


def _imports(path: str, mod: str, known: set[str]) -> set[str]:
  """The project modules `path` imports, anywhere in it."""
  out = set()
  package = mod if path.endswith("__init__.py") else mod.rpartition(".")[0]
  for node in ast.walk(ast.parse(open(path).read())):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
      # `from pkg import sub` imports the submodule; `from pkg import name` imports the package
      names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    for n in names:
      while n and n not in known:
        n = n.rpartition(".")[0]
      if n and n != mod:
        out.add(n)
  return out


def _graph():
  mods = dict(_modules())
  known = set(mods)
  return {m: _imports(p, m, known) for m, p in mods.items()}


def test_no_layer_imports_a_higher_one():
  bad = [(m, d) for m, deps in _graph().items() for d in deps
         if RANK[d.split(".")[0]] > RANK[m.split(".")[0]] or
         (RANK[d.split(".")[0]] == RANK[m.split(".")[0]] and d.split(".")[0] != m.split(".")[0])]
  assert not bad, bad


def test_no_import_circles():
  graph = _graph()
  state, stack, cycles = {}, [], []

  def visit(m):
    state[m] = "open"
    stack.append(m)
    for d in sorted(graph.get(m, ())):
      if state.get(d) == "open":
        cycles.append(stack[stack.index(d):] + [d])
      elif d not in state:
        visit(d)
    stack.pop()
    state[m] = "done"
  for m in sorted(graph):
    if m not in state:
      visit(m)
  assert not cycles, cycles
