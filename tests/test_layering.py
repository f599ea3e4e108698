"""The package's floors: no module imports one above it, not even inside a function.

Every module under realign_jax/ is parsed (ast, nothing imported) and each of
its `realign_jax` imports checked against the floors below, low to high. Code
under `if __name__ == "__main__":` is the module run as a binary and may reach
any floor. No library module imports a binary: only the binaries themselves
and the studies (experiments/) may (`BINARIES`).
"""

import ast
import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "realign_jax"

# Low to high. A module's floor is that of its longest listed prefix.
FLOORS = [
    # errors, paths, start-up, gin utilities, the argument precheck, config value checks
    ("plumbing", ["plumbing", ""]),
    ("models", ["models"]),
    ("data", ["data"]),
    ("decoding, rewards, parallel, checkpoints",
     ["decoding", "rewards", "parallel", "checkpoints"]),
    ("training", ["training"]),
    ("evaluation", ["evaluation"]),
    # The decoding methods, component and prompt loading, and the one batch loop that every
    # decoder runs through (the binaries, the studies, the synthetic-preference builder).
    ("inference", ["inference"]),
    # The realignment server's engine and ASGI app, on the inference package.
    ("serving", ["serving"]),
    # NOTE: the sweep machinery is a binary too (train, decode, evaluate, convert, sweep,
    # serve, the synthetic-preference builder).
    ("binaries", ["decode", "serve", "train", "evaluate", "sweep", "convert",
                  "synthetic_preferences", "sweeps"]),
    # The studies run the binaries' code: each a package (config, pipeline, results, report)
    # on the shared stage machinery, statistics and figures of experiments/.
    ("studies", ["experiments"]),
]

# The binary modules (each a `main` run by `python -m`): libraries do not import them.
BINARIES = ("train", "decode", "evaluate", "convert", "sweep", "synthetic_preferences", "serve")
# Besides the binaries themselves, the studies may import one (a study runs the others' code).
MAY_IMPORT_BINARIES = BINARIES + ("experiments",)

# (importer, imported) pairs allowed to reach up, each with why; the test also fails when one
# is no longer needed, so the list only shrinks.
KNOWN: set = {
    # The binaries' start-up: the multi-host flags are checked with the arguments, and
    # the processes join (multihost.initialize) after the gin files parse and before the
    # configured function asks JAX for devices. Function-local; only binaries call them.
    ("realign_jax.plumbing.cli", "realign_jax.parallel"),
    ("realign_jax.plumbing.gin_utils", "realign_jax.parallel"),
}


def floor_of(module: str) -> int:
  """The floor index of a dotted module name under realign_jax."""
  rest = module[len(PACKAGE) + 1:] if module != PACKAGE else ""
  best, best_len = None, -1
  for i, (_, prefixes) in enumerate(FLOORS):
    for p in prefixes:
      if (rest == p or rest.startswith(p + ".") or (p == "" and rest == "")) and len(p) > best_len:
        best, best_len = i, len(p)
  if best is None:
    raise AssertionError(f"{module} is on no floor: add it to FLOORS in tests/test_layering.py")
  return best


def _is_main_guard(node) -> bool:
  t = node.test if isinstance(node, ast.If) else None
  return (isinstance(t, ast.Compare) and isinstance(t.left, ast.Name)
          and t.left.id == "__name__" and len(t.comparators) == 1
          and isinstance(t.comparators[0], ast.Constant) and t.comparators[0].value == "__main__")


def imports_of(tree) -> list:
  """(line, imported module) for every realign_jax import outside `if __name__ == "__main__"`."""
  out = []

  def visit(node):
    if _is_main_guard(node):
      for child in node.orelse:
        visit(child)
      return
    if isinstance(node, ast.Import):
      out.extend((node.lineno, a.name) for a in node.names
                 if a.name == PACKAGE or a.name.startswith(PACKAGE + "."))
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and (
        node.module == PACKAGE or node.module.startswith(PACKAGE + ".")):
      if node.module == PACKAGE:  # from realign_jax import decode: the module named
        out.extend((node.lineno, f"{PACKAGE}.{a.name}") for a in node.names)
      else:
        out.append((node.lineno, node.module))
    for child in ast.iter_child_nodes(node):
      visit(child)

  visit(tree)
  return out


def _modules():
  root = os.path.join(REPO_ROOT, PACKAGE)
  for dirpath, _, names in os.walk(root):
    for n in sorted(names):
      if n.endswith(".py"):
        path = os.path.join(dirpath, n)
        rel = os.path.relpath(path, REPO_ROOT)[:-3].replace(os.sep, ".")
        yield (rel[:-len(".__init__")] if rel.endswith(".__init__") else rel), path


def _violations():
  out = []
  for module, path in _modules():
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    for line, imported in imports_of(tree):
      if floor_of(imported) > floor_of(module):
        out.append((module, imported, f"{os.path.relpath(path, REPO_ROOT)}:{line}: {module} "
                    f"({FLOORS[floor_of(module)][0]}) imports {imported} "
                    f"({FLOORS[floor_of(imported)][0]})"))
  return out


def test_no_module_imports_a_higher_floor():
  bad = [msg for mod, imp, msg in _violations() if (mod, imp) not in KNOWN]
  assert not bad, "imports up the floors:\n" + "\n".join(bad)


def test_every_known_exception_is_still_needed():
  found = {(mod, imp) for mod, imp, _ in _violations()}
  assert KNOWN <= found, f"no longer needed, remove from KNOWN: {sorted(KNOWN - found)}"


def _is_under(module: str, names) -> bool:
  rest = module[len(PACKAGE) + 1:] if module != PACKAGE else ""
  return any(rest == n or rest.startswith(n + ".") for n in names)


def test_no_library_module_imports_a_binary():
  bad = []
  for module, path in _modules():
    if _is_under(module, MAY_IMPORT_BINARIES):
      continue
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    bad += [f"{os.path.relpath(path, REPO_ROOT)}:{line}: {module} imports the binary {imported}"
            for line, imported in imports_of(tree) if _is_under(imported, BINARIES)]
  assert not bad, "library modules importing a binary:\n" + "\n".join(bad)


def test_the_checker_sees_function_level_imports():
  tree = ast.parse("def f():\n  from realign_jax.training import policy\n"
                   "if __name__ == '__main__':\n  from realign_jax.plumbing import gin_utils\n")
  assert imports_of(tree) == [(2, "realign_jax.training")]
  assert floor_of("realign_jax.training.policy") > floor_of("realign_jax.rewards.learned")
  assert floor_of("realign_jax.decode") == len(FLOORS) - 2
  assert floor_of("realign_jax.experiments.length_reward.pipeline") == len(FLOORS) - 1
  assert floor_of("realign_jax.experiments.stages") == len(FLOORS) - 1
  assert (floor_of("realign_jax.evaluation.kl") < floor_of("realign_jax.inference.loop")
          < floor_of("realign_jax.decode"))
  assert _is_under("realign_jax.decode", BINARIES)
  assert not _is_under("realign_jax.decoding.dera", BINARIES)
