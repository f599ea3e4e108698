"""Who owns a run directory, what config it was started with, which vocabulary it reads.

* `RunLock`: `MODEL_DIR/run.lock` holds the owner's host and pid while a
  training run is in the directory. A second run is refused with one line
  naming the owner; a lock left by a process that no longer exists on this
  host is stale and taken over (one line says so). A lock from another host
  cannot be checked from here: the message says how to remove it.
* `check_resume_config`: `MODEL_DIR/run_config.gin` records every binding the
  run was started with (`gin.config_str()`). A resume whose bindings differ in
  anything but the step count is refused, naming the first difference, unless
  the user allows it explicitly; an allowed change is appended to
  `MODEL_DIR/config_changes.jsonl` (step, old and new values) and becomes the
  recorded config.
* `vocabulary_identity` / `check_vocabulary`: `model.json` records the
  vocabulary a run was trained with (its path and the SHA-256 of the file);
  decoding, evaluating or aligning with another vocabulary is refused unless
  the user overrides it explicitly.

MODEL_DIR may be an object-store URI (gs://): the config records go through
`realign_jax.paths`. The lock stays local (see `RunLock`); the vocabulary
files are read locally.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from typing import Optional

from realign_jax import paths
from realign_jax.errors import UserError

LOCK_FILE = "run.lock"
RUN_CONFIG = "run_config.gin"
CONFIG_CHANGES = "config_changes.jsonl"
# Bindings that may change between a run's start and its resume: the step
# count (a run is extended by raising it) and where the run directory is named.
RESUMABLE_BINDINGS = frozenset({
    "TRAIN_STEPS", "train.train_steps", "MODEL_DIR", "train.model_dir",
    "TrainerConfig.progress", "train.allow_config_change",
})
BUILTIN_VOCAB = "built-in"


# ---- the lock -------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by another user
    return True
  return True


class RunLock:
  """`with RunLock(model_dir):` holds `MODEL_DIR/run.lock` for the block.

  NOTE: the lock needs a create-if-absent write (O_EXCL) and a pid to check on
  this host. Object stores offer neither through epath (a plain write
  replaces, and a preempted pod restarts on another host, leaving a lock no
  one could check), so a remote MODEL_DIR is not locked: one warning line says
  that a second run into it is not detected.
  """

  def __init__(self, model_dir: str):
    self.path = os.path.join(model_dir, LOCK_FILE)
    self._held = False
    self._remote = paths.is_remote(model_dir)

  def _owner(self) -> Optional[dict]:
    try:
      with open(self.path, encoding="utf-8") as f:
        return json.load(f)
    except (OSError, ValueError):
      return None

  def acquire(self) -> "RunLock":
    if self._remote:
      logging.warning("MODEL_DIR %s is not on a local disk: it is not locked, so another run "
                      "started into it is not detected", os.path.dirname(self.path))
      return self
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    for _ in range(3):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        owner = self._owner()
        if owner is None:
          # NOTE: a lock being written this instant, or a torn one; retry once
          # before calling it stale.
          time.sleep(0.2)
          owner = self._owner()
        if owner is None or (owner.get("host") == me["host"] and
                             not _pid_alive(int(owner.get("pid", -1)))):
          what = "unreadable" if owner is None else f"left by pid {owner.get('pid')}, which has exited"
          logging.warning("taking over the stale lock %s (%s)", self.path, what)
          try:
            os.unlink(self.path)
          except FileNotFoundError:
            pass
          continue
        if owner.get("host") == me["host"]:
          raise UserError(f"MODEL_DIR {os.path.dirname(self.path)} is in use by pid "
                          f"{owner.get('pid')} on this host (lock {self.path}); wait for it "
                          "or use another MODEL_DIR")
        raise UserError(f"MODEL_DIR {os.path.dirname(self.path)} is in use by pid "
                        f"{owner.get('pid')} on host {owner.get('host')} (lock {self.path}); if "
                        "that run is gone, delete the lock file")
      with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(me, f)
      self._held = True
      return self
    raise UserError(f"could not take the lock {self.path} (another run keeps replacing it)")

  def release(self) -> None:
    if not self._held:
      return
    self._held = False
    owner = self._owner()
    if owner is not None and owner.get("pid") == os.getpid():
      try:
        os.unlink(self.path)
      except FileNotFoundError:
        pass

  def __enter__(self) -> "RunLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


# ---- the recorded config ----------------------------------------------------------
def parse_bindings(text: str) -> dict[str, str]:
  """`gin.config_str()` text -> {binding: value text}; comments and imports dropped.

  A binding starts at column 0 (`name = value`); gin indents a long value's
  continuation lines.
  """
  out: dict[str, str] = {}
  name = None
  for line in text.splitlines():
    if not line.strip() or line.lstrip().startswith("#"):
      continue
    if line[0].isspace() and name is not None:
      out[name] += " " + line.strip()
      continue
    if line.startswith(("import ", "from ", "include ")) or "=" not in line:
      name = None
      continue
    key, value = line.split("=", 1)
    name = key.strip()
    out[name] = value.strip()
  return {k: " ".join(v.split()) for k, v in out.items()}


def config_differences(old: str, new: str) -> list[tuple[str, Optional[str], Optional[str]]]:
  """(binding, old value, new value) for every binding that differs, step count aside."""
  a, b = parse_bindings(old), parse_bindings(new)
  diffs = []
  for key in sorted(set(a) | set(b)):
    if key in RESUMABLE_BINDINGS or a.get(key) == b.get(key):
      continue
    diffs.append((key, a.get(key), b.get(key)))
  return diffs


def check_resume_config(model_dir: str, config_text: str, *, step: int,
                        allow_change: bool = False) -> None:
  """Records the config at a run's start; refuses a resume under another one (see module doc)."""
  from realign_jax.checkpoints.manager import atomic_write_text
  path = os.path.join(model_dir, RUN_CONFIG)
  if not paths.exists(path):
    atomic_write_text(path, config_text)
    return
  old = paths.read_text(path)
  diffs = config_differences(old, config_text)
  if not diffs:
    return
  if not allow_change:
    key, was, now = diffs[0]
    more = f" (and {len(diffs) - 1} more)" if len(diffs) > 1 else ""
    raise UserError(
        f"MODEL_DIR {model_dir} was started with another config: {key} = {was or '(unset)'} "
        f"there, {now or '(unset)'} now{more} ({path}); use a fresh MODEL_DIR, or resume under "
        "the new config deliberately with --gin.train.allow_config_change=True")
  record = {"step": step, "time": time.time(),
            "changes": [{"binding": k, "old": o, "new": n} for k, o, n in diffs]}
  paths.append_text(os.path.join(model_dir, CONFIG_CHANGES), json.dumps(record) + "\n")
  atomic_write_text(path, config_text)
  logging.warning("resuming %s at step %d under a changed config (%d bindings; recorded in %s)",
                  model_dir, step, len(diffs), CONFIG_CHANGES)


# ---- the vocabulary ----------------------------------------------------------------
def vocabulary_identity(vocab_path: Optional[str]) -> dict:
  """{"path", "sha256"} of a sentencepiece model file; None is the built-in one."""
  from realign_jax.data import vocab as vocab_lib
  path = vocab_lib.resolve_vocab_path(vocab_path)
  try:
    with open(path, "rb") as f:
      digest = hashlib.sha256(f.read()).hexdigest()
  except OSError as e:
    raise UserError(f"cannot read vocabulary {path}: {e.strerror}") from e
  return {"path": BUILTIN_VOCAB if vocab_path is None else path, "sha256": digest}


def recorded_vocabulary(model_dir: str) -> Optional[dict]:
  """model.json's "vocab" entry of a run directory, or None (absent, or no model.json).

  For a Hugging Face directory: the identity of its tokenizer file.
  """
  from realign_jax.checkpoints import hf_import  # NOTE: lazy, as the binaries import it
  if hf_import.is_hf_dir(model_dir):
    return hf_import.hf_vocabulary(model_dir)
  try:
    with paths.open(os.path.join(model_dir, "model.json")) as f:
      return json.load(f).get("vocab")
  except (OSError, ValueError, AttributeError):
    return None


def check_vocabulary(model_dir: str, recorded: Optional[dict], vocab_path: Optional[str], *,
                     allow_other: bool = False, where: str = "") -> None:
  """Refuses `vocab_path` when `model_dir`'s model.json recorded another vocabulary.

  `recorded` is model.json's "vocab" entry (None for runs written before it was
  recorded: nothing to compare, accepted).
  """
  if not recorded or allow_other:
    return
  mine = vocabulary_identity(vocab_path)
  if mine["sha256"] == recorded.get("sha256"):
    return
  from realign_jax.checkpoints import hf_import  # NOTE: lazy, as the binaries import it
  if hf_import.is_hf_dir(model_dir) and mine["sha256"] in {
      v["sha256"] for v in hf_import.hf_vocabularies(model_dir)}:
    return  # NOTE: any of an HF directory's tokenizer files (tokenizer.json or .model)
  prefix = f"{where}: " if where else ""
  raise UserError(
      f"{prefix}{model_dir} was trained with vocabulary {recorded.get('path')} (sha256 "
      f"{str(recorded.get('sha256'))[:12]}...), not {mine['path']} (sha256 "
      f"{mine['sha256'][:12]}...); pass that vocabulary, or override deliberately with "
      "allow_vocabulary_mismatch=True")
