"""A training run's directory: who owns it, what it records, what it was started with.

`RunDir` owns MODEL_DIR for the train binary; its checks run once, and nothing
is written there until the run is sure to start:

  run = RunDir(model_dir)          # MODEL_DIR empty, or not a directory: refused
  with run:                        # process 0 holds the lock
    run.check(algorithm.run_record(), allow_config_change=..., ...)   # writes nothing
    trainer.train(model_dir=run, ...)  # builds the state, then `run.start()` records
    run.finish()                   # config.gin again at the end

* The lock (`RunLock`): `MODEL_DIR/run.lock` holds the owner's host and pid
  while a training run is in the directory. A second run is refused with one
  line naming the owner; a lock left by a process that no longer exists on
  this host is stale and taken over (one line says so). A lock from another
  host cannot be checked from here: the message says how to remove it.
* `model.json`: the family, config, parameter layout (unrolled or scanned) and
  output head of the model its checkpoints belong to, and the vocabulary the
  run reads (`vocabulary_identity`: its path and the SHA-256 of the file), so
  the decoder and later stages rebuild the model from the directory alone and
  refuse another model or vocabulary before compute (`check_vocabulary`,
  unless the user overrides it explicitly).
* The configs: `run_config.gin` records every binding the run was started
  with (`gin.config_str()`). A resume whose bindings differ in anything but
  the step count is refused, naming the first difference, unless the user
  allows it explicitly; an allowed change is appended to
  `config_changes.jsonl` (step, old and new values) and becomes the recorded
  config. `config.gin` is the operative config, written at the start and at
  the end.
* INIT_CHECKPOINT: a run directory (or a Hugging Face one) that exists, holds
  a model of this run's family and size, and read this run's vocabulary.

`RunDir.check` checks all of it (process 0; every process agrees on the
outcome); the trainer then builds the state (loads INIT_CHECKPOINT or
resumes) and draws its first batch, and only then does `RunDir.start` write
model.json and the configs and create `checkpoints/`. A failed start leaves
the directory as it was (one it created is removed again), so the corrected
command is not refused as "started with another config".

MODEL_DIR may be an object-store URI (gs://): the records go through
`realign_jax.plumbing.paths`. The lock stays local (see `RunLock`); the vocabulary
files are read locally.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import socket
import time
from typing import Any, Optional

import gin
import jax

from realign_jax.plumbing import paths
from realign_jax.checkpoints.hf import files as hf_files
from realign_jax.data import hf_tokenizer
from realign_jax.data import vocab as vocab_lib
from realign_jax.plumbing.errors import UserError
from realign_jax.models import layout as layout_lib
from realign_jax.models.config import DecoderConfig, ModelConfig, SpecialTokens, T5Config
from realign_jax.parallel import multihost

LOCK_FILE = "run.lock"
MODEL_JSON = "model.json"
RUN_CONFIG = "run_config.gin"
OPERATIVE_CONFIG = "config.gin"
CONFIG_CHANGES = "config_changes.jsonl"
CHECKPOINT_SUBDIR = "checkpoints"
# Bindings that may change between a run's start and its resume: the step
# count (a run is extended by raising it) and where the run directory is named.
RESUMABLE_BINDINGS = frozenset({
    "TRAIN_STEPS", "train.train_steps", "MODEL_DIR", "train.model_dir",
    "TrainerConfig.progress", "train.allow_config_change",
})
BUILTIN_VOCAB = "built-in"


# ---- what a run records ------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RunRecord:
  """What a training algorithm records in its run directory (`Algorithm.run_record`).

  model: the `LanguageModel` trained (model.json); None records no model.json.
  vocab_path: the vocabulary it reads (model.json's "vocab"; None: the built-in one).
  init_checkpoint: the run (or HF) directory it starts from, checked before the start.
  batch_size: its global batch, checked to divide over the processes and the mesh.
  """

  model: Any = None
  vocab_path: Optional[str] = None
  init_checkpoint: Optional[str] = None
  batch_size: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class _Plan:
  """What `RunDir.start` writes, as `RunDir.check` found it."""

  model: Any
  vocab: dict
  config_text: str
  config_diffs: Optional[list]  # None: nothing to record; []: the recorded one
  step: int


class RunDir:
  """A training run's directory (see the module doc): lock, records, configs, checks."""

  def __init__(self, path: str):
    if not path:
      raise UserError("MODEL_DIR is empty")
    check_run_dir(path)
    self.path = path
    self._lock: Optional[RunLock] = None
    self._created = False
    self._plan: Optional[_Plan] = None

  @property
  def checkpoint_dir(self) -> str:
    return os.path.join(self.path, CHECKPOINT_SUBDIR)

  def checkpoint_steps(self) -> list[int]:
    """The steps under `checkpoints/` (complete or not: the directories named by a number)."""
    ckpts = self.checkpoint_dir
    return sorted(int(d) for d in (paths.listdir(ckpts) if paths.isdir(ckpts) else [])
                  if d.isdigit())

  # ---- ownership ----------------------------------------------------------------
  def __enter__(self) -> "RunDir":
    """Process 0 takes the lock (making MODEL_DIR for it); the others hold nothing."""
    if jax.process_index() == 0:
      self._created = not paths.exists(self.path)
      paths.makedirs(self.path)
      self._lock = RunLock(self.path).acquire()
    return self

  def __exit__(self, *exc) -> None:
    if self._lock is not None:
      self._lock.release()
      self._lock = None
    if self._created and not paths.is_remote(self.path):
      try:  # NOTE: only when empty: a run that did not start leaves no directory behind
        os.rmdir(self.path)
      except OSError:
        pass

  # ---- checks ---------------------------------------------------------------------
  def check(self, record: RunRecord, *, allow_config_change: bool = False,
            allow_vocabulary_mismatch: bool = False) -> None:
    """Whether the run may start here: the model, vocabulary, config and INIT_CHECKPOINT.

    Writes nothing. Process 0 checks (it speaks for the run); every process
    raises when it refuses, so none goes on into collectives it will not join.
    """
    refused = None
    if jax.process_index() == 0:
      try:
        self._plan = self._checked(record, gin.config_str(), allow_config_change,
                                   allow_vocabulary_mismatch)
      except UserError as e:
        refused = e
    if multihost.any_process(refused is not None):
      raise refused or UserError(f"process 0 refused to start the run in {self.path} "
                                 "(its error line says why)")

  def _checked(self, record: RunRecord, config_text: str, allow_config_change: bool,
               allow_vocabulary_mismatch: bool) -> _Plan:
    vocab = vocabulary_identity(record.vocab_path)
    if isinstance(record.init_checkpoint, str) and record.init_checkpoint:
      check_init_checkpoint(record.init_checkpoint, record.model, record.vocab_path,
                            allow_vocabulary_mismatch=allow_vocabulary_mismatch)
    model = record.model
    path = os.path.join(self.path, MODEL_JSON)
    if model is not None and paths.exists(path):
      previous, _ = read_model_json(self.path)
      if previous != model.config:
        raise UserError(f"{path} describes another model than this config ({previous} vs "
                        f"{model.config}); use a fresh MODEL_DIR")
      check_vocabulary(self.path, recorded_vocabulary(self.path), record.vocab_path,
                       allow_other=allow_vocabulary_mismatch, where="resume")
    diffs = None
    if config_text.strip():
      diffs = _config_diffs(self.path, config_text, allow_config_change)
    return _Plan(model, vocab, config_text, diffs, max(self.checkpoint_steps(), default=0))

  # ---- records --------------------------------------------------------------------
  def start(self) -> None:
    """Records the checked run: model.json, run_config.gin, config.gin and `checkpoints/`.

    Called by the trainer once the run is sure to start (its state is built).
    Without `check` (the trainer called directly) it only makes the directories.
    """
    failed = None
    try:
      # NOTE: process 0 alone makes them (MODEL_DIR too, a gs:// one as well); the
      # agreement below is the barrier after which the others' checkpoint writes land.
      if jax.process_index() == 0:
        paths.makedirs(self.checkpoint_dir)
      if jax.process_index() == 0 and self._plan is not None:
        plan = self._plan
        if plan.config_diffs is not None:
          _record_config(self.path, plan.config_text, plan.config_diffs, plan.step)
        self.write_operative_config()  # NOTE: at the start, so a running job has one
        if plan.model is not None:
          write_model_json(self.path, plan.model.config, plan.model.output_head, vocab=plan.vocab)
    except (UserError, OSError) as e:
      failed = e
    if multihost.any_process(failed is not None):
      raise failed or UserError(f"process 0 could not record the run in {self.path}")

  def finish(self) -> None:
    """The operative config again at the end (every configurable has been called)."""
    if self._plan is not None:
      self.write_operative_config()

  def write_operative_config(self) -> None:
    if jax.process_index() == 0:
      paths.atomic_write_text(os.path.join(self.path, OPERATIVE_CONFIG),
                              gin.operative_config_str())


def check_run_dir(model_dir: str) -> None:
  """Refuses a MODEL_DIR (or its checkpoint directory) that exists but is not a directory."""
  for path, what in ((model_dir, "MODEL_DIR"),
                     (os.path.join(model_dir, CHECKPOINT_SUBDIR), "the checkpoint directory")):
    if paths.exists(path) and not paths.isdir(path):
      raise UserError(f"{what} {path} exists and is not a directory")


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
          what = ("unreadable" if owner is None
                  else f"left by pid {owner.get('pid')}, which has exited")
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


def _config_diffs(model_dir: str, config_text: str, allow_change: bool) -> list:
  """The differences from the recorded config ([] when none is recorded); refused unless allowed."""
  path = os.path.join(model_dir, RUN_CONFIG)
  if not paths.exists(path):
    return []
  diffs = config_differences(paths.read_text(path), config_text)
  if diffs and not allow_change:
    key, was, now = diffs[0]
    more = f" (and {len(diffs) - 1} more)" if len(diffs) > 1 else ""
    raise UserError(
        f"MODEL_DIR {model_dir} was started with another config: {key} = {was or '(unset)'} "
        f"there, {now or '(unset)'} now{more} ({path}); use a fresh MODEL_DIR, or resume under "
        "the new config deliberately with --gin.train.allow_config_change=True")
  return diffs


def _record_config(model_dir: str, config_text: str, diffs: list, step: int) -> None:
  """Records the config at a run's start, or an allowed change of it at a resume."""
  path = os.path.join(model_dir, RUN_CONFIG)
  if paths.exists(path) and not diffs:
    return
  if diffs:
    record = {"step": step, "time": time.time(),
              "changes": [{"binding": k, "old": o, "new": n} for k, o, n in diffs]}
    paths.append_text(os.path.join(model_dir, CONFIG_CHANGES), json.dumps(record) + "\n")
    logging.warning("resuming %s at step %d under a changed config (%d bindings; recorded in "
                    "%s)", model_dir, step, len(diffs), CONFIG_CHANGES)
  paths.atomic_write_text(path, config_text)


def check_resume_config(model_dir: str, config_text: str, *, step: int,
                        allow_change: bool = False) -> None:
  """Records the config at a run's start; refuses a resume under another one (see module doc)."""
  _record_config(model_dir, config_text, _config_diffs(model_dir, config_text, allow_change),
                 step)


# ---- the vocabulary ----------------------------------------------------------------
def vocabulary_identity(vocab_path: Optional[str]) -> dict:
  """{"path", "sha256"} of a sentencepiece model file; None is the built-in one."""
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
  if hf_files.is_hf_dir(model_dir):
    return hf_tokenizer.hf_vocabulary(model_dir)
  try:
    with paths.open(os.path.join(model_dir, MODEL_JSON)) as f:
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
  if hf_files.is_hf_dir(model_dir):
    if mine["sha256"] in {v["sha256"] for v in hf_tokenizer.hf_vocabularies(model_dir)}:
      return  # NOTE: any of an HF directory's tokenizer files (tokenizer.json or .model)
  prefix = f"{where}: " if where else ""
  raise UserError(
      f"{prefix}{model_dir} was trained with vocabulary {recorded.get('path')} (sha256 "
      f"{str(recorded.get('sha256'))[:12]}...), not {mine['path']} (sha256 "
      f"{mine['sha256'][:12]}...); pass that vocabulary, or override deliberately with "
      "allow_vocabulary_mismatch=True")


# ---- model.json ----------------------------------------------------------------------
def write_model_json(model_dir: str, config: ModelConfig, output_head: str = "lm",
                     vocab: Optional[dict] = None) -> None:
  """`vocab`: the vocabulary's identity (`vocabulary_identity`), when known."""
  paths.makedirs(model_dir)
  fields = dataclasses.asdict(config)
  # NOTE: the special token ids sit next to the config: they belong to the
  # model/tokenizer pair, not to the architecture.
  special = fields.pop("tokens")
  doc = {"family": config.family, "output_head": output_head,
         "layout": layout_lib.layout(config), "config": fields, "special_tokens": special}
  if vocab is not None:
    doc["vocab"] = vocab
  paths.atomic_write_text(os.path.join(model_dir, MODEL_JSON), json.dumps(doc, indent=2))


def read_model_json(model_dir: str) -> tuple[ModelConfig, str]:
  """(config, output_head) of a run directory, or of a Hugging Face directory ("lm")."""
  if hf_files.is_hf_dir(model_dir):
    from realign_jax.checkpoints.hf import load as hf_load  # NOTE: lazy: Flax (hf.load imports models.api)
    return hf_load.hf_model_config(model_dir), "lm"
  path = os.path.join(model_dir, MODEL_JSON)
  if not paths.exists(path):
    raise UserError(f"{path} not found: not a run directory written by realign_jax.train")
  try:
    with paths.open(path) as f:
      doc = json.load(f)
    cls = {"t5": T5Config, "decoder": DecoderConfig}[doc["family"]]
    fields = dict(doc["config"])
    # NOTE: written before layouts existed: unrolled.
    layout = doc.get("layout", "scanned" if fields.get("scan_layers") else "unrolled")
    if layout not in layout_lib.LAYOUTS:
      raise ValueError(f"layout {layout!r} is not one of {', '.join(layout_lib.LAYOUTS)}")
    fields["scan_layers"] = layout == "scanned"
    # NOTE: written before the ids were recorded: T5's (the only ids then supported).
    special = doc.get("special_tokens", fields.pop("tokens", None)) or {}
    fields.pop("tokens", None)
    if not isinstance(special, dict):
      raise ValueError(f"special_tokens must be an object, got {special!r}")
    return cls(**fields, tokens=SpecialTokens(**special)), doc.get("output_head", "lm")
  except UserError as e:
    raise UserError(f"{path}: {e}") from None
  except (KeyError, TypeError, ValueError) as e:
    raise UserError(f"{path} is malformed: {e}") from e


def read_run_model(model_dir: str, what: str) -> tuple[ModelConfig, str]:
  """(config, output_head) of the run (or HF) directory that setting `what` names.

  One line when it is empty, does not exist, or is no such directory.
  """
  if not model_dir:
    raise UserError(f"{what} is empty")
  if not paths.isdir(model_dir):  # NOTE: a gs:// run directory too
    raise UserError(f"{what} {model_dir} does not exist")
  if not paths.exists(os.path.join(model_dir, MODEL_JSON)) and not hf_files.is_hf_dir(model_dir):
    raise UserError(f"{what} {model_dir} has no {MODEL_JSON}: not a run directory written by "
                    "realign_jax.train (nor a Hugging Face directory)")
  return read_model_json(model_dir)


# ---- INIT_CHECKPOINT -----------------------------------------------------------------
def check_init_checkpoint(init_checkpoint: str, model: Any, vocab_path: Optional[str], *,
                          allow_vocabulary_mismatch: bool = False,
                          what: str = "INIT_CHECKPOINT") -> None:
  """Refuses a start from a directory that is missing or holds another model or vocabulary.

  `model` (a `LanguageModel`, or None: not compared) must be of the
  checkpoint's family and size: the same parameter shapes, whatever the
  layouts (a scanned model starts from an unrolled checkpoint) and heads (a
  reward model starts from an SFT run's trunk).
  """
  found, _ = read_run_model(init_checkpoint, what)
  if model is not None:
    config = model.config
    if found.family != config.family:
      raise UserError(f"{what} {init_checkpoint} holds a {found.family} model but this run's "
                      f"model is a {config.family} model")
    _check_size(init_checkpoint, found, config, what)
  check_vocabulary(init_checkpoint, recorded_vocabulary(init_checkpoint), vocab_path,
                   allow_other=allow_vocabulary_mismatch, where=what)


def _trunk_shapes(config: ModelConfig) -> dict:
  from realign_jax.models.api import LanguageModel  # NOTE: lazy: flax and the model code
  abstract, _ = LanguageModel(dataclasses.replace(config, scan_layers=False)).abstract_init()
  return {jax.tree_util.keystr(p): tuple(x.shape)
          for p, x in jax.tree_util.tree_flatten_with_path(abstract)[0]}


def _check_size(path: str, found: ModelConfig, config: ModelConfig, what: str) -> None:
  """One line naming the setting that gives `found` other parameter shapes than `config`."""
  mine = _trunk_shapes(config)
  if _trunk_shapes(found) == mine:
    return
  for field in dataclasses.fields(config):
    there, here = getattr(found, field.name), getattr(config, field.name)
    if there == here:
      continue
    try:
      alone = _trunk_shapes(dataclasses.replace(config, **{field.name: there})) != mine
    except Exception:  # NOTE: a setting that needs others changed with it (heads and dims)
      alone = False
    if alone:
      raise UserError(f"{what} {path} holds a model of another size: {field.name}={there!r} "
                      f"there, {here!r} in this run's model config")
  raise UserError(f"{what} {path} holds a model of another size than this run's model config")
