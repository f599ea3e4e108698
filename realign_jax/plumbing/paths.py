"""Where the package's configs live, and the file operations of run directories and outputs.

`REPO_ROOT` holds configs/ and gin/: the checkout, else the installed package
(the wheel ships them inside it).

The file operations take local paths and Cloud Storage URIs (`gs://bucket/run`)
alike. A local path goes through `os`/`shutil` exactly
as before; a URI goes through `etils.epath` (TensorFlow's gfile when it is
installed). This is the bottom floor: it imports no other realign_jax module,
so its errors are the OS's (callers turn them into `UserError` lines).
"""

import os
import shutil
from typing import IO, Union

# NOTE: this file is realign_jax/plumbing/paths.py; the package is two levels up.
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PathLike = Union[str, os.PathLike]
# The object store epath writes to here: with TensorFlow installed (a dependency) it
# goes through tf.io.gfile, which has no s3:// or az:// file system. Any other
# `xx://` stays a (strange) local path, as before.
REMOTE_PREFIXES = ("gs://",)


def _config_root() -> str:
  """The directory holding configs/ and gin/: the checkout, else the installed package."""
  checkout = os.path.dirname(PACKAGE_DIR)
  if os.path.isdir(os.path.join(checkout, "gin", "models")):
    return checkout
  if os.path.isdir(os.path.join(PACKAGE_DIR, "gin", "models")):
    return PACKAGE_DIR
  return checkout


REPO_ROOT = _config_root()


# ---- local or remote ------------------------------------------------------------
def is_remote(path: PathLike) -> bool:
  """Whether `path` is an object-store URI (gs://)."""
  return os.fspath(path).startswith(REMOTE_PREFIXES)


def as_path(path: PathLike):
  """`path` as an `etils.epath.Path` (a URI stays a URI)."""
  # NOTE: imported here: etils.epath costs ~50 ms (asyncio, unittest.mock) and
  # the binaries check their arguments before any heavy import.
  from etils import epath
  return epath.Path(path)


def abspath(path: PathLike) -> str:
  """`os.path.abspath` for a local path; a URI is already absolute (abspath would make it gs:/...)."""
  path = os.fspath(path)
  return path if is_remote(path) else os.path.abspath(path)


def exists(path: PathLike) -> bool:
  return as_path(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path: PathLike) -> bool:
  return as_path(path).is_dir() if is_remote(path) else os.path.isdir(path)


def isfile(path: PathLike) -> bool:
  if is_remote(path):
    p = as_path(path)
    return p.exists() and not p.is_dir()
  return os.path.isfile(path)


def getsize(path: PathLike) -> int:
  return as_path(path).stat().length if is_remote(path) else os.path.getsize(path)


def makedirs(path: PathLike) -> None:
  """Creates `path` and its parents; an existing directory is fine."""
  if is_remote(path):
    as_path(path).mkdir(parents=True, exist_ok=True)
  else:
    os.makedirs(path, exist_ok=True)


def listdir(path: PathLike) -> list:
  """The names in directory `path`."""
  if is_remote(path):
    return [p.name for p in as_path(path).iterdir()]
  return os.listdir(path)


def open(path: PathLike, mode: str = "r", encoding: str = "utf-8") -> IO:  # noqa: A001
  """Opens a file; text is UTF-8 (the only encoding epath writes)."""
  if is_remote(path):
    return as_path(path).open(mode)
  import builtins
  return builtins.open(path, mode, encoding=None if "b" in mode else encoding)


def read_text(path: PathLike) -> str:
  with open(path) as f:
    return f.read()


def remove(path: PathLike) -> None:
  """Removes a file (FileNotFoundError when there is none)."""
  if is_remote(path):
    as_path(path).unlink()
  else:
    os.remove(path)


def rmtree(path: PathLike, ignore_errors: bool = False) -> None:
  if is_remote(path):
    try:
      as_path(path).rmtree()
    except OSError:
      if not ignore_errors:
        raise
  else:
    shutil.rmtree(path, ignore_errors=ignore_errors)


def move(src: PathLike, dst: PathLike) -> None:
  """Moves a file or a directory (a rename on one file system or bucket)."""
  if not is_remote(src) and not is_remote(dst):
    shutil.move(src, dst)
    return
  if is_remote(src) != is_remote(dst):
    raise OSError(f"cannot move {src} to {dst}: not on the same file system")
  as_path(src).rename(dst)


# ---- whole files ------------------------------------------------------------------
def atomic_write_bytes(path: PathLike, data: bytes) -> None:
  """Writes `path` so that it appears only complete.

  Local: a temporary file beside it, then renamed over it. An object store
  creates an object in one write, atomically: no temporary object.
  """
  _atomic_write(path, data, "wb")


def atomic_write_text(path: PathLike, text: str) -> None:
  """`atomic_write_bytes` for UTF-8 text."""
  _atomic_write(path, text, "w")


def _atomic_write(path: PathLike, data, mode: str) -> None:
  if is_remote(path):
    with as_path(path).open(mode) as f:
      f.write(data)
    return
  path = os.fspath(path)
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with open(tmp, mode) as f:
      f.write(data)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def append_text(path: PathLike, text: str) -> None:
  """Appends `text` to `path` (created when absent).

  NOTE: an object cannot be appended to: a URI's object is read and written
  whole again (one write, so it is never seen torn); this costs its size per
  call, fine for the run's logs.
  """
  if is_remote(path):
    p = as_path(path)
    old = p.read_text() if p.exists() else ""
    atomic_write_text(path, old + text)
    return
  with open(path, "a") as f:
    f.write(text)
