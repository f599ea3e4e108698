"""Process start-up of the binaries: arguments checked first, a quiet terminal.

Every binary calls `precheck(__name__)` before its heavy imports (JAX, Flax,
orbax, TensorFlow through seqio). When the module runs as `__main__` this

  * takes `--verbosity=N` off the command line (absl's convention: -1, the
    default, shows warnings and errors; 0 adds informational lines and every
    native library's start-up logging; 1 and more add debug lines),
  * sets the environment that the native libraries read when they load
    (TensorFlow's and XLA's C++ log level),
  * answers `--help` (the flags, and with `--gin_file` the config's required
    macros; exit 0),
  * checks the arguments, that every `--gin_file` exists and that the gin
    files and `--gin.X=Y` / `--gin_bindings` overrides parse, so that such a
    user error costs a fraction of a second and prints one line
    (`error: ...`, exit 2).

Bindings that name an unknown configurable are found later, when the binary
has registered its configurables (`gin_utils.parse`), and are one line too.

TensorFlow (only the data pipeline uses it) is imported through
`import_tensorflow()`, which keeps its C++ start-up lines (absl's
pre-initialisation warning, oneDNN, CUDA driver probing, CPU feature notes)
off the terminal unless `--verbosity` >= 0, and hides every GPU from
TensorFlow so that it never takes accelerator memory from JAX.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import tokenize
from typing import Optional

from realign_jax.errors import UserError

# absl's default: warnings and errors only.
DEFAULT_VERBOSITY = -1
_state = {"verbosity": DEFAULT_VERBOSITY}

# Loggers whose informational lines are noise to a user of the binaries
# (orbax logs through absl: "Given directory is read only", save progress).
_CHATTY_LOGGERS = ("absl", "orbax", "jax._src.xla_bridge", "tensorflow")


def verbosity() -> int:
  return _state["verbosity"]


def verbose() -> bool:
  """Whether the user asked for informational logging (`--verbosity` >= 0)."""
  return _state["verbosity"] >= 0


def strip_verbosity(argv: list[str]) -> tuple[list[str], int]:
  """Removes `--verbosity=N` / `--verbosity N` / `-v N` from `argv`."""
  rest, level = [], DEFAULT_VERBOSITY
  it = iter(argv)
  for a in it:
    value = None
    if a.startswith("--verbosity="):
      value = a.split("=", 1)[1]
    elif a in ("--verbosity", "-v"):
      value = next(it, None)
      if value is None:
        raise UserError(f"{a} needs a value (an integer, e.g. {a} 0)")
    else:
      rest.append(a)
      continue
    try:
      level = int(value)
    except ValueError:
      raise UserError(f"--verbosity={value!r} is not an integer") from None
  return rest, level


def configure(level: int) -> None:
  """Sets the logging environment for `level`, before the native libraries load."""
  _state["verbosity"] = level
  # NOTE: read by TensorFlow's and XLA's C++ logging when their libraries load;
  # a user's own setting wins.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if level >= 0 else "3")
  python_level = (logging.DEBUG if level >= 1 else
                  logging.INFO if level == 0 else logging.WARNING)
  fmt = "%(levelname)s %(name)s: %(message)s" if level >= 0 else "%(levelname)s: %(message)s"
  logging.basicConfig(level=python_level, format=fmt)
  logging.getLogger().setLevel(python_level)
  for name in ("",) + _CHATTY_LOGGERS:
    # NOTE: orbax's and jax's informational lines go through these loggers;
    # at the default verbosity only their warnings and errors reach the user.
    logger = logging.getLogger(name)
    if name:
      logger.setLevel(python_level)
    logger.filters[:] = [f for f in logger.filters if not isinstance(f, _DropNoise)]
    if level < 0:
      logger.addFilter(_DropNoise())
  try:
    from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
    absl_logging.set_verbosity(level if level >= 0 else absl_logging.WARNING)
  except ImportError:
    pass


class _DropNoise(logging.Filter):
  """Drops library lines that are routine, not warnings, for this project."""

  # NOTE: orbax warns on every read-only open of a checkpoint directory, which
  # is how decoding and evaluation open a run (twice per load); gin logs an
  # error for every search path that lacks an included file, even when a
  # later one has it (a file found nowhere is the binaries' one-line error);
  # orbax times every wait for the previous async save, which a loaded machine
  # turns into a warning at every checkpoint.
  _PREFIXES = ("Given directory is read only", "Path not found: ",
               "Waiting for previous save to complete took")

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(self._PREFIXES)


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
  spec = getattr(sys.modules.get("__main__"), "__spec__", None)
  return spec.name if spec is not None else os.path.basename(sys.argv[0])


def _doc_summary(module: str) -> str:
  main = sys.modules.get("__main__")
  doc = (getattr(main, "__doc__", None) or "").strip()
  return doc.split("\n\n")[0].strip() if doc else module


def required_macros(gin_file: str, seen: Optional[set] = None) -> list[str]:
  """Macros left at %gin.REQUIRED in `gin_file` and its includes, in order of first mention."""
  import re
  from realign_jax import gin_utils
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
  from realign_jax import gin_utils
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
  from realign_jax import gin_utils
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


@contextlib.contextmanager
def native_stderr_silenced():
  """Sends what native code writes to file descriptor 2 to a scratch file.

  On an exception the captured text is written back to stderr before the
  exception propagates, so a failing import still explains itself.
  """
  if verbose():
    yield
    return
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as scratch:
    os.dup2(scratch.fileno(), 2)
    try:
      yield
    except BaseException:
      os.dup2(saved, 2)
      scratch.seek(0)
      sys.stderr.write(scratch.read().decode("utf-8", "replace"))
      raise
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)


def import_tensorflow():
  """TensorFlow, imported quietly and kept off every accelerator."""
  if "tensorflow" in sys.modules:
    return sys.modules["tensorflow"]
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if verbose() else "3")
  with native_stderr_silenced():
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    try:
      # NOTE: TensorFlow only reads data here; a GPU it claimed would be
      # memory taken from JAX.
      tf.config.set_visible_devices([], "GPU")
    except (RuntimeError, ValueError):  # devices already initialised
      pass
  return tf
