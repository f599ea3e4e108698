"""Process start-up of the binaries: a quiet terminal and TensorFlow kept in its place.

The bottom floor of the package (only `errors` below it): the verbosity, the
environment the native libraries read when they load, the logging filters and
`import_tensorflow()`. The binaries' argument precheck, which needs their gin
plumbing, is `realign_jax.plumbing.cli.precheck`: every binary calls it before its heavy
imports (JAX, Flax, orbax, TensorFlow through seqio). When the module runs as
`__main__` that

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
has registered its configurables (`gin_utils.parse`), and are one line too (see cli.py).

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
from typing import Optional

from realign_jax.plumbing.errors import UserError

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
