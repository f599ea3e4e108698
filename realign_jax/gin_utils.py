"""Gin plumbing for the binaries (t5x conventions).

`--gin_file=F` (repeatable) and `--gin.NAME=VALUE` overrides; gin files are
looked up relative to the working directory, then the repository root (so
`include 'gin/models/t5_tiny.gin'` works from anywhere). Configurables are
registered here, in one place, and only the binaries call `register()`.
"""

import os
import sys
from typing import Callable, Sequence

import gin

from realign_jax.errors import UserError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_REGISTERED = False


def register() -> None:
  """Makes the library's entry points configurable (idempotent)."""
  global _REGISTERED
  if _REGISTERED:
    return
  from realign_jax.models import api
  from realign_jax.models import config  # noqa: F401  (T5Config, DecoderConfig)
  from realign_jax.parallel import partitioning  # noqa: F401
  from realign_jax.training import optim, sft, trainer
  gin.external_configurable(api.LanguageModel, "LanguageModel")
  gin.external_configurable(sft.SFT, "SFT")
  gin.external_configurable(optim.make_optimizer, "make_optimizer")
  gin.external_configurable(trainer.TrainerConfig, "TrainerConfig")
  # NOTE: each package declares its own gin surface in `configurables.py`
  # (`register()` there makes its entry points configurable), so the
  # binaries' configurable names are listed per package, in one place each.
  import importlib
  for pkg in _CONFIGURABLE_PACKAGES:
    try:
      mod = importlib.import_module(f"realign_jax.{pkg}.configurables")
    except ModuleNotFoundError as e:
      if e.name != f"realign_jax.{pkg}.configurables":
        raise
      continue
    mod.register()
  _REGISTERED = True


_CONFIGURABLE_PACKAGES = ("rewards", "training", "decoding", "evaluation", "experiments")


def split_args(argv: Sequence[str]) -> tuple[list, list, list]:
  """Separates --gin_file and --gin.X=Y arguments from the rest."""
  files, bindings, rest = [], [], []
  it = iter(argv)
  for a in it:
    if a.startswith("--gin_file="):
      files.append(a.split("=", 1)[1])
    elif a == "--gin_file":
      try:
        files.append(next(it))
      except StopIteration:
        raise UserError("--gin_file needs a value") from None
    elif a.startswith("--gin."):
      body = a[len("--gin."):]
      if "=" not in body:
        raise UserError(f"override {a!r} must look like --gin.NAME=VALUE")
      bindings.append(body)
    else:
      rest.append(a)
  return files, bindings, rest


def resolve_gin_file(path: str) -> str:
  for base in ("", os.getcwd(), REPO_ROOT):
    cand = os.path.join(base, path) if base else path
    if os.path.isfile(cand):
      return cand
  raise UserError(f"gin file {path} not found (looked in the working directory and {REPO_ROOT})")


def parse(files: Sequence[str], bindings: Sequence[str]) -> None:
  """Parses gin files and overrides; errors become one-line UserErrors."""
  register()
  gin.clear_config()
  for p in (os.getcwd(), REPO_ROOT):
    gin.add_config_file_search_path(p)
  resolved = [resolve_gin_file(f) for f in files]
  try:
    # NOTE: finalizing runs gin's hooks, which reject a macro left at
    # %gin.REQUIRED (e.g. MODEL_DIR); without them the REQUIRED sentinel object
    # itself would be passed on as the value.
    gin.parse_config_files_and_bindings(resolved, list(bindings), finalize_config=True)
  except (ValueError, KeyError, SyntaxError, TypeError, IOError) as e:
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
  from realign_jax import startup
  argv, level = startup.strip_verbosity(list(argv))
  files, bindings, rest = split_args(argv)
  if rest:
    raise UserError(f"unknown arguments: {' '.join(rest)}")
  if not files:
    raise UserError("no --gin_file given")
  if level != startup.verbosity():
    startup.configure(level)
  register()  # NOTE: first, so a package's own registration of `name` is found below
  for obj, obj_name in ((fn, name), *extra):
    try:
      gin.get_configurable(obj_name)
    except ValueError:
      gin.external_configurable(obj, obj_name)
  parse(files, bindings)
  return gin.get_configurable(name)


def write_operative_config(model_dir: str, name: str = "config.gin") -> str:
  from realign_jax.checkpoints.manager import atomic_write_text
  os.makedirs(model_dir, exist_ok=True)
  path = os.path.join(model_dir, name)
  atomic_write_text(path, gin.operative_config_str())
  return path


def run_main(main: Callable[[list], int]) -> None:
  """Runs a binary's main(argv): one-line errors and exit codes for the user."""
  from realign_jax.training.trainer import PREEMPTED_EXIT_CODE, Preempted
  try:
    code = main(sys.argv[1:])
  except UserError as e:
    # NOTE: gin appends "In call to configurable ..." on a new line; keep line one.
    print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
    sys.exit(2)
  except Preempted as e:
    print(str(e), file=sys.stderr)
    sys.exit(PREEMPTED_EXIT_CODE)
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    sys.exit(130)
  sys.exit(code or 0)
