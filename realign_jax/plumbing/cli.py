"""The binaries' first call: `precheck(__name__)`, before their heavy imports.

See startup.py for what a binary's start-up does. This module sits on the
binaries' floor (it reads gin files through gin_utils and the multi-host flags
through parallel.multihost) and imports nothing heavy at module level, so a
bad argument costs a fraction of a second and prints one line.
"""

from __future__ import annotations

import os
import sys
import tokenize
from typing import Optional

from realign_jax.plumbing import gin_utils
from realign_jax.plumbing.errors import UserError
from realign_jax.plumbing.startup import configure, strip_verbosity


def precheck(module_name: str) -> None:
  """A binary's first call: see the module docstring. No-op unless run as main."""
  if module_name != "__main__":
    return
  try:
    argv, level = strip_verbosity(sys.argv[1:])
    if any(a in ("--help", "-h", "--helpfull") for a in argv):
      print(usage(module_name_of_main(), [a for a in argv
                                          if a not in ("--help", "-h", "--helpfull")]))
      sys.exit(0)
    configure(level)
    _check_gin_arguments(argv)
  except UserError as e:
    print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
    sys.exit(2)
  sys.argv[1:] = argv


FLAG_HELP = (
    ("--gin_file=FILE", "a gin config (repeatable; later files override earlier ones)"),
    ("--gin.NAME=VALUE", "override one binding or macro, e.g. --gin.TRAIN_STEPS=100"),
    ("--gin_bindings='NAME = VALUE'", "the same in t5x's spelling (repeatable)"),
    ("--gin_search_paths=DIR1,DIR2", "where --gin_file and include paths are looked for "
     "first (then the working directory, then the shipped configs/ and gin/)"),
    ("--verbosity=N", "-1 (default): warnings and errors; 0: informational lines; 1: debug"),
    ("--coordinator_address=HOST:PORT", "multi-host: process 0's address (with the next two)"),
    ("--num_processes=N", "multi-host: number of processes"),
    ("--process_id=I", "multi-host: this process, 0..N-1 (SLURM and TPU pods are detected)"),
    ("--initialization_timeout=S", "multi-host: seconds to wait for the coordinator "
     "(default 300)"),
    ("--help", "this text; with --gin_file, also the config's required macros"),
)


def module_name_of_main() -> str:
  """What `python -m` ran: a module, or a package (its __main__ module stripped)."""
  spec = getattr(sys.modules.get("__main__"), "__spec__", None)
  if spec is None:
    return os.path.basename(sys.argv[0])
  return spec.name[:-len(".__main__")] if spec.name.endswith(".__main__") else spec.name


def _doc_summary(module: str) -> str:
  main = sys.modules.get("__main__")
  doc = (getattr(main, "__doc__", None) or "").strip()
  return doc.split("\n\n")[0].strip() if doc else module


def required_macros(gin_file: str, seen: Optional[set] = None) -> list[str]:
  """Macros left at %gin.REQUIRED in `gin_file` and its includes, in order of first mention."""
  import re
  seen = set() if seen is None else seen
  path = gin_utils.resolve_gin_file(gin_file)
  if path in seen:
    return []
  seen.add(path)
  required, assigned = [], set()
  with open(path) as f:
    text = f.read()
  for line in text.splitlines():
    line = line.split("#", 1)[0].strip()
    inc = re.match(r"include\s+['\"](.+)['\"]", line)
    if inc:
      required += [m for m in required_macros(inc.group(1), seen) if m not in required]
      continue
    m = re.match(r"([A-Z][A-Z0-9_]*)\s*=\s*(.+)", line)
    if not m:
      continue
    if m.group(2).strip() == "%gin.REQUIRED":
      if m.group(1) not in required:
        required.append(m.group(1))
    elif m.group(1) in required:
      required.remove(m.group(1))  # a later file binds it
  return required


def usage(module: str, argv: list[str]) -> str:
  """`--help`'s text: the flags, then each given config's required macros."""
  lines = [f"usage: python -m {module} --gin_file=CONFIG.gin [--gin.NAME=VALUE ...]", "",
           _doc_summary(module), "", "flags:"]
  width = max(len(f) for f, _ in FLAG_HELP)
  lines += [f"  {f.ljust(width)}  {h}" for f, h in FLAG_HELP]
  paths, rest = gin_utils.split_search_paths(argv)
  gin_utils.set_search_paths(paths)
  files, bindings, _ = gin_utils.split_args(rest)
  if files:
    required = []
    for f in files:
      required += [m for m in required_macros(f) if m not in required]
    bound = {b.split("=", 1)[0].strip() for b in bindings}
    lines += ["", f"required macros of {', '.join(files)}:"]
    lines += [f"  {m}{'  (given)' if m in bound else ''}" for m in required] or ["  (none)"]
  return "\n".join(lines)


def _check_gin_arguments(argv: list[str]) -> None:
  """Argument syntax, gin files present, gin syntax: no configurable needed."""
  import gin
  # NOTE: lazy: it reaches up a floor (KNOWN in tests/test_layering.py); only binaries call it.
  from realign_jax.parallel import multihost
  argv, host_flags = multihost.split_flags(argv)
  multihost.layout(host_flags)  # NOTE: the flags' values checked; nothing started
  paths, argv = gin_utils.split_search_paths(argv)
  gin_utils.set_search_paths(paths)
  files, bindings, rest = gin_utils.split_args(argv)
  if rest:
    raise UserError(f"unknown arguments: {' '.join(rest)}")
  if not files:
    raise UserError("no --gin_file given")
  resolved = [gin_utils.resolve_gin_file(f) for f in files]
  gin.clear_config()
  gin_utils.add_search_paths()
  try:
    # NOTE: skip_unknown: the configurables are registered only after the
    # heavy imports; here only the syntax, includes and values are checked.
    gin.parse_config_files_and_bindings(resolved, list(bindings), skip_unknown=True,
                                        finalize_config=False)
  except (ValueError, KeyError, SyntaxError, TypeError, IOError, tokenize.TokenError) as e:
    raise UserError(f"gin: {gin_utils.first_line(e)}") from e
  finally:
    gin.clear_config()
