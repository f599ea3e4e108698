"""Gin plumbing for the binaries (t5x conventions).

`--gin_file=F` (repeatable), `--gin_bindings='NAME = VALUE'` (repeatable) and
`--gin.NAME=VALUE` overrides, `--gin_search_paths=DIR1,DIR2` (repeatable, where
`--gin_file` and `include` paths are looked for first, as in t5x). After them gin
files are looked up relative to the working directory, then the directory that
holds `configs/` and `gin/`: the source checkout, or the installed package when
installed from a wheel (both ship there as package data), so
`--gin_file=configs/sft/builtin_tiny.gin` and `include 'gin/models/t5_tiny.gin'`
work from any directory. Configurables are registered here, in one place, and
only the binaries call `register()`.
"""

import os
import sys
import tokenize
from typing import Callable, Optional, Sequence

import gin

from realign_jax.plumbing import paths
from realign_jax.plumbing import startup
from realign_jax.plumbing.errors import PREEMPTED_EXIT_CODE, Preempted, UserError

# NOTE: the config root is found on the bottom floor (models/sizes.py reads it too).
PACKAGE_DIR, REPO_ROOT = paths.PACKAGE_DIR, paths.REPO_ROOT
_search_paths: list = []  # --gin_search_paths of this process, searched first
_REGISTERED = False


def register() -> None:
  """Makes the library's entry points configurable (idempotent; the binaries call it).

  The one way configurables are registered: each package lists its gin surface in
  its `configurables.py` (`register()` there). The exceptions are the few that gin
  files import by module (`from realign_jax.models import config`): the model
  configs and the partitioning functions decorate themselves, so a size file parses
  without this (models/sizes.py).
  """
  global _REGISTERED
  if _REGISTERED:
    return
  import importlib
  # NOTE: loaded by name at run time: this floor imports no package above it.
  for pkg in CONFIGURABLE_PACKAGES:
    importlib.import_module(f"realign_jax.{pkg}.configurables").register()
  _REGISTERED = True


CONFIGURABLE_PACKAGES = ("models", "parallel", "rewards", "training", "decoding", "evaluation",
                         "inference", "experiments")


def split_args(argv: Sequence[str]) -> tuple[list, list, list]:
  """Separates --gin_file, --gin_bindings and --gin.X=Y arguments from the rest.

  `--gin_search_paths` stays in the rest (see `split_search_paths`).
  """
  files, bindings, rest = [], [], []
  it = iter(argv)
  for a in it:
    flag = a.split("=", 1)[0]
    if flag in ("--gin_file", "--gin_bindings"):
      if "=" in a:
        value = a.split("=", 1)[1]
      else:
        value = next(it, None)
        if value is None:
          raise UserError(f"{flag} needs a value")
      (files if flag == "--gin_file" else bindings).append(value)
    elif a.startswith("--gin."):
      body = a[len("--gin."):]
      if "=" not in body:
        raise UserError(f"override {a!r} must look like --gin.NAME=VALUE")
      bindings.append(body)
    else:
      rest.append(a)
  return files, bindings, rest


def split_search_paths(argv: Sequence[str]) -> tuple[list, list]:
  """(directories of every `--gin_search_paths=A,B`, the other arguments)."""
  paths, rest = [], []
  it = iter(argv)
  for a in it:
    if a.split("=", 1)[0] != "--gin_search_paths":
      rest.append(a)
      continue
    value = a.split("=", 1)[1] if "=" in a else next(it, None)
    if value is None:
      raise UserError("--gin_search_paths needs a value (directories separated by commas)")
    for p in (v.strip() for v in value.split(",")):
      if not p:
        continue
      if not os.path.isdir(p):
        raise UserError(f"--gin_search_paths: {p} is not a directory")
      paths.append(os.path.abspath(p))
  return paths, rest


def set_search_paths(paths: Sequence[str]) -> None:
  _search_paths[:] = list(paths)


def search_paths() -> list:
  """Where gin files and includes are looked for, in order."""
  out = []
  for p in (*_search_paths, os.getcwd(), REPO_ROOT):
    if p not in out:
      out.append(p)
  return out


def resolve_gin_file(path: str) -> str:
  if os.path.isabs(path) and os.path.isfile(path):
    return path
  for base in search_paths():
    cand = os.path.join(base, path)
    if os.path.isfile(cand):
      return cand
  if os.path.isfile(path):
    return path
  raise UserError(f"gin file {path} not found (looked in {', '.join(search_paths())})")


def add_search_paths() -> None:
  """Gives gin this process's search paths (after a `gin.clear_config()`)."""
  # NOTE: gin tries a search path only when the file is not found as given
  # (relative to the working directory); the earlier path wins.
  for p in search_paths():
    gin.add_config_file_search_path(p)


def parse(files: Sequence[str], bindings: Sequence[str]) -> None:
  """Parses gin files and overrides; errors become one-line UserErrors."""
  register()
  gin.clear_config()
  add_search_paths()
  resolved = [resolve_gin_file(f) for f in files]
  try:
    # NOTE: finalizing runs gin's hooks, which reject a macro left at
    # %gin.REQUIRED (e.g. MODEL_DIR); without them the REQUIRED sentinel object
    # itself would be passed on as the value.
    gin.parse_config_files_and_bindings(resolved, list(bindings), finalize_config=True)
  except (ValueError, KeyError, SyntaxError, TypeError, IOError, tokenize.TokenError) as e:
    raise UserError(f"gin: {first_line(e)}") from e


def first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return " ".join(text[:3]) if text else type(e).__name__


def call(fn: Callable, **kwargs):
  """Calls a gin-configured function, turning missing REQUIRED bindings into UserError."""
  try:
    return fn(**kwargs)
  except (ValueError, TypeError) as e:
    msg = str(e)
    if "Required bindings" in msg or "gin.REQUIRED" in msg or "required" in msg.lower() and (
        "gin" in msg.lower()):
      raise UserError(f"gin: {first_line(e)}") from e
    raise


def configure_binary(argv: Sequence[str], name: str, fn: Callable,
                     extra: Sequence[tuple] = ()) -> Callable:
  """A binary's argument handling: `--gin_file`/`--gin.X=Y` in, the configured `fn` out.

  Registers `fn` as configurable `name` (and each `(obj, name)` in `extra`),
  parses the gin files and overrides, and returns the configured callable;
  unknown arguments or no gin file are a UserError.
  """
  # NOTE: lazy: it reaches up a floor (KNOWN in tests/test_layering.py); only binaries call it.
  from realign_jax.parallel import multihost
  given = list(argv)
  argv, level = startup.strip_verbosity(given)
  # NOTE: a binary run as main had --verbosity taken off its command line by
  # cli.precheck, which set the level: an argv without it keeps that level.
  asked = len(argv) != len(given)
  argv, host_flags = multihost.split_flags(argv)
  paths, argv = split_search_paths(argv)
  set_search_paths(paths)
  files, bindings, rest = split_args(argv)
  if rest:
    raise UserError(f"unknown arguments: {' '.join(rest)}")
  if not files:
    raise UserError("no --gin_file given")
  if asked and level != startup.verbosity():
    startup.configure(level)
  register()  # NOTE: first, so a package's own registration of `name` is found below
  for obj, obj_name in ((fn, name), *extra):
    try:
      gin.get_configurable(obj_name)
    except ValueError:
      gin.external_configurable(obj, obj_name)
  parse(files, bindings)
  # NOTE: after the arguments are checked (a typo costs no coordinator wait)
  # and before the configured function asks JAX for its devices.
  multihost.initialize(host_flags)
  return gin.get_configurable(name)


def write_operative_config(model_dir: str, name: str = "config.gin") -> Optional[str]:
  """Writes gin's operative config into `model_dir` (process 0 only; None elsewhere).

  `model_dir` may be a gs:// URI (see `realign_jax.plumbing.paths`).
  """
  import jax
  if jax.process_index() != 0:
    return None
  paths.makedirs(model_dir)
  path = os.path.join(model_dir, name)
  paths.atomic_write_text(path, gin.operative_config_str())
  return path


def write_operative_config_beside(output_file: str) -> Optional[str]:
  """The operative config next to a binary's output: OUT.config.gin beside OUT (process 0)."""
  path = paths.abspath(output_file)
  return write_operative_config(os.path.dirname(path), os.path.basename(path) + ".config.gin")


def run_main(main: Callable[[list], int]) -> None:
  """Runs a binary's main(argv): one-line errors and exit codes for the user."""
  try:
    code = main(sys.argv[1:])
  except UserError as e:
    # NOTE: gin appends "In call to configurable ..." on a new line; keep line one.
    print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
    sys.exit(2)
  except Preempted as e:
    print(str(e).splitlines()[0], file=sys.stderr)  # NOTE: without gin's "In call to" line
    sys.exit(PREEMPTED_EXIT_CODE)
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    sys.exit(130)
  sys.exit(code or 0)
