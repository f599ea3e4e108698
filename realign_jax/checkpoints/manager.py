"""The one checkpoint path: orbax CheckpointManager under `MODEL_DIR/checkpoints`.

Saving (`Checkpointer`, which the trainer drives) and loading (`load_params`,
for every later use of a run's params). The rest of a run directory, its lock,
`model.json` and configs, is `run_dir.RunDir`'s; `load_params` reads the
layout a checkpoint was saved in from its model.json.

Orbax writes each step to a temporary directory and renames it when complete,
so a run killed mid-save leaves the previous checkpoint as the latest.

Checkpoints are checked where they are read: a step that cannot be read (an
empty directory, an empty `_METADATA`, a truncated array file) or that holds
non-finite values is named in a one-line `UserError`; resuming falls back to
the newest intact step and moves the broken ones to `MODEL_DIR/broken_checkpoints`.
A failed write (a full disk) is a one-line `UserError` naming the step's path.

MODEL_DIR may be an object-store URI (`gs://bucket/run`): orbax writes there
itself (through epath and TensorStore); the other files and moves here go
through `realign_jax.plumbing.paths`.
"""

import contextlib
import gc
import json
import logging
import os
import re
import sys
import types
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from realign_jax.plumbing import paths
from realign_jax.checkpoints.hf import files as hf_files
from realign_jax.checkpoints.run_dir import CHECKPOINT_SUBDIR, MODEL_JSON, read_model_json
from realign_jax.plumbing.errors import UserError
from realign_jax.models import layout as layout_lib

BROKEN_SUBDIR = "broken_checkpoints"
# orbax's item directory inside a step (one unnamed item) and its tree metadata
_ITEM_DIR = "default"
_TREE_METADATA = "_METADATA"


def atomic_write_text(path: str, text: str) -> None:
  """Writes `text` so that `path` appears only complete (`paths.atomic_write_text`)."""
  paths.atomic_write_text(path, text)


def atomic_write_jsonl(path: str, rows) -> None:
  """One JSON object per line, written atomically (see `atomic_write_text`)."""
  atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


# ---- shape checks -----------------------------------------------------------
def _shape_tree(tree) -> dict:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(p): tuple(getattr(x, "shape", ())) for p, x in flat}


def check_shapes(found: Any, expected: Any, where: str) -> None:
  """Raises UserError naming the first parameter whose presence or shape differs."""
  f, e = _shape_tree(found), _shape_tree(expected)
  for key, shape in e.items():
    if key not in f:
      raise UserError(f"{where}: parameter {key} missing (a checkpoint of another model?)")
    if tuple(f[key]) != tuple(shape):
      raise UserError(f"{where}: parameter {key} has shape {tuple(f[key])}, the model expects "
                      f"{tuple(shape)} (a checkpoint of another model size?)")
  extra = sorted(set(f) - set(e))
  if extra:
    raise UserError(f"{where}: unexpected parameter {extra[0]} (a checkpoint of another model?)")


def _params_metadata(mngr, step):
  """The `params` subtree of a checkpoint's array metadata (shapes), or None."""
  try:
    return mngr.item_metadata(step)["params"]
  except (KeyError, TypeError):
    return None


# ---- integrity ----------------------------------------------------------------
class BrokenCheckpoint(UserError):
  """A checkpoint step that cannot be read or holds non-finite values."""

  def __init__(self, step: int, path: str, reason: str):
    super().__init__(f"checkpoint step {step} at {path} {reason}")
    self.step, self.path, self.reason = step, path, reason


def root_cause(e: BaseException) -> str:
  """The innermost message along an exception's `raise ... from` chain, on one line.

  NOTE: TensorStore's outer exception prints its whole spec over many lines;
  the cause says what is wrong ("Requested byte range ... is not valid for
  value of size 1000").
  """
  chain = [e]
  while chain[-1].__cause__ is not None and len(chain) < 20:
    chain.append(chain[-1].__cause__)
  for x in reversed(chain):
    text = " ".join(str(x).split()).split(" See full TensorStore details")[0]
    if text:
      return text if len(text) <= 300 else text[:297] + "..."
  return type(e).__name__


def _chain(e: BaseException) -> list:
  out = []
  while e is not None and len(out) < 20 and all(e is not x for x in out):
    out.append(e)
    e = e.__cause__ or e.__context__
  return out


def _step_problem(step_dir: str) -> Optional[str]:
  """Why a step directory is certainly not a readable checkpoint (cheap checks), or None."""
  if not paths.isdir(step_dir):
    return "is missing"
  if not paths.listdir(step_dir):
    return "is an empty directory, not a checkpoint"
  meta = os.path.join(step_dir, _ITEM_DIR, _TREE_METADATA)
  if paths.isfile(meta):
    if paths.getsize(meta) == 0:
      return f"is incomplete: {meta} is empty"
    try:
      with paths.open(meta) as f:
        json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
      return f"is corrupt: {meta} is not valid JSON ({e})"
  return None


def _read_step(step: int, step_dir: str, read: Callable[[], Any]) -> Any:
  """`read()` (a metadata read and restore of one step); failures become `BrokenCheckpoint`."""
  problem = _step_problem(step_dir)
  if problem:
    raise BrokenCheckpoint(step, step_dir, problem)
  _drop_abandoned_read_noise()
  try:
    return read()
  except UserError:
    raise
  except Exception as e:  # NOTE: orbax, TensorStore and json raise many types for bad files
    if any(isinstance(x, MemoryError) or "RESOURCE_EXHAUSTED" in str(x) for x in _chain(e)):
      raise  # out of memory is not a broken checkpoint
    reason = f"cannot be read (corrupt or truncated): {root_cause(e)}"
  # NOTE: outside the except block, so that the traceback (and the frames
  # holding the other arrays' pending reads) is gone before closing them.
  _close_abandoned_reads()
  raise BrokenCheckpoint(step, step_dir, reason)


# NOTE: orbax reads a checkpoint's arrays concurrently. When one read fails,
# the others are abandoned in a closed event loop, and each echoes the failure
# later with a traceback: TensorStore's completion of a read ("Event loop is
# closed"), asyncio ("Task exception was never retrieved") and the suspended
# read itself when finalized ("Exception ignored in: <coroutine ...>", at
# interpreter exit at the latest). The failure is reported in one line: these
# echoes are dropped (`_drop_abandoned_read_noise`, installed before a read,
# since the first comes from another thread during it) and the reads closed.
def _close_abandoned_reads() -> None:
  gc.collect()
  for obj in gc.get_objects():
    if (isinstance(obj, types.CoroutineType) and obj.cr_frame is not None
        and not obj.cr_running and obj.cr_code.co_name.startswith("_read")
        and "orbax" in obj.cr_code.co_filename):
      try:
        obj.close()
      except Exception:  # NOTE: orbax's reads turn GeneratorExit into an exception
        pass
  gc.collect()


def _is_abandoned_read_noise(unraisable) -> bool:
  obj = getattr(unraisable, "object", None)
  code = getattr(obj, "cr_code", None)
  if code is not None:
    return "orbax" in code.co_filename and code.co_name.startswith("_read")
  exc = getattr(unraisable, "exc_value", None)
  return obj is None and isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


def _raised_in_orbax_read(exc: BaseException) -> bool:
  """Whether `exc` is of orbax's reading of arrays (its frames) or TensorStore's (its message)."""
  for x in _chain(exc):
    text = str(x)
    if "TensorStore" in text or re.match(r"[A-Z_]+: Error (reading|opening) ", text):
      return True
    tb = x.__traceback__
    while tb is not None:
      code = tb.tb_frame.f_code
      if "orbax" in code.co_filename and ("read" in code.co_name or "deserialize" in code.co_name):
        return True
      tb = tb.tb_next
  return False


class _AbandonedTaskLogFilter(logging.Filter):
  """Drops asyncio's "... exception was never retrieved" of orbax's abandoned reads."""

  def filter(self, record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    return not ("exception was never retrieved" in str(record.msg) and exc is not None
                and _raised_in_orbax_read(exc))


def _drop_abandoned_read_noise() -> None:
  """Installs (once) the filters of the echoes of abandoned reads."""
  if getattr(sys.unraisablehook, "_realign_jax", False):
    return
  previous = sys.unraisablehook

  def hook(unraisable):
    if not _is_abandoned_read_noise(unraisable):
      previous(unraisable)
  hook._realign_jax = True
  sys.unraisablehook = hook
  logging.getLogger("asyncio").addFilter(_AbandonedTaskLogFilter())


_leaf_finite = jax.jit(lambda xs: [jnp.all(jnp.isfinite(x)) for x in xs])


def first_nonfinite(tree: Any) -> Optional[str]:
  """The path of the first floating-point leaf of `tree` holding a NaN or inf, or None.

  One jitted reduction over the (possibly sharded) leaves, scalars to the host.
  """
  flat = [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
          if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
  # NOTE: the params first: they are what a user recognises (the optimizer
  # state goes non-finite with them).
  flat.sort(key=lambda kv: not kv[0].startswith("['params']"))
  if not flat:
    return None
  flags = jax.device_get(_leaf_finite([x for _, x in flat]))
  return next((key for (key, _), ok in zip(flat, flags) if not ok), None)


def _is_write_failure(e: BaseException) -> bool:
  """An OS-level failure to write (a full disk, no permission), however orbax wraps it."""
  return any(isinstance(x, OSError) or "No space left on device" in str(x) for x in _chain(e))


class _OrbaxLogFilter(logging.Filter):
  """Drops orbax's logs of what this module reports itself, in one line.

  NOTE: an async save fails in orbax's background thread, which logs the
  traceback twice before the error reaches `Checkpointer` (that names the
  step's path); a step directory without orbax's metadata (an empty stray
  one) is warned about when the steps are listed, before it is found broken.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    # NOTE: not by `record.pathname`: without absl's own logger class that is
    # absl's logging module, not orbax.
    msg = str(record.msg)
    exc = record.exc_info[1] if record.exc_info else None
    if exc is not None and "save" in msg.lower() and _is_write_failure(exc):
      return False
    return not msg.startswith("Metadata file does not exist")


_ORBAX_LOG_FILTER = _OrbaxLogFilter()


def _quiet_orbax() -> None:
  logging.getLogger("absl").addFilter(_ORBAX_LOG_FILTER)  # orbax logs through absl


# ---- manager ----------------------------------------------------------------
class Checkpointer:
  """Save every N steps and at the end, keep K, restore the latest.

  `model_dir` is a run directory (`run_dir.RunDir` checks it); `checkpoints/`
  in it is made by `RunDir.start`, or by the first save.
  """

  def __init__(self, model_dir: str, *, keep: int = 3, async_save: bool = True):
    _quiet_orbax()
    self.model_dir = paths.abspath(model_dir)
    self.directory = os.path.join(self.model_dir, CHECKPOINT_SUBDIR)
    # NOTE: create=False: nothing is written into MODEL_DIR before the run starts.
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=False,
                                           enable_async_checkpointing=async_save,
                                           cleanup_tmp_directories=True)
    self._mngr = ocp.CheckpointManager(self.directory, options=options,
                                       item_handlers=ocp.StandardCheckpointHandler())
    self._pending = None  # the step of a save not yet known to be complete
    self._failed = False  # a write failure was reported

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def latest_step(self) -> Optional[int]:
    return self._mngr.latest_step()

  def save(self, step: int, state: Any) -> None:
    # NOTE: the previous (async) save first, so a failure of it names its own step.
    self.wait()
    with self._writing(step):
      self._mngr.save(step, args=ocp.args.StandardSave(state), force=True)
    self._pending = step

  @contextlib.contextmanager
  def _writing(self, step: int):
    """A failure to write step `step` (a full disk) becomes one UserError naming its path."""
    try:
      yield
    except Exception as e:
      if not _is_write_failure(e):
        raise
      self._failed = True
      # NOTE: orbax writes into `<step>.orbax-checkpoint-tmp*` and renames it
      # when complete: the earlier steps are untouched; the partial one goes.
      partial = f"{step}.orbax-checkpoint-tmp"
      for name in (paths.listdir(self.directory) if paths.isdir(self.directory) else []):
        if name.startswith(partial):
          paths.rmtree(os.path.join(self.directory, name), ignore_errors=True)
      earlier = [s for s in self._mngr.all_steps() if s < step]
      kept = (f"the earlier checkpoints are intact (latest: step {max(earlier)})" if earlier
              else "no earlier checkpoint")
      raise UserError(f"could not write checkpoint step {step} to {self.step_dir(step)}: "
                      f"{root_cause(e)}; {kept}") from e

  def restore(self, abstract_state: Any, step: Optional[int] = None) -> Any:
    """Restores into the shapes and shardings of `abstract_state` (ShapeDtypeStructs).

    A step that cannot be read or holds a NaN or inf raises `BrokenCheckpoint`.
    """
    step = self.latest_step() if step is None else step
    where = f"checkpoint {self.directory} step {step}"
    step_dir = self.step_dir(step)

    def read():
      found = _params_metadata(self._mngr, step)
      if found is not None and "params" in abstract_state:
        check_shapes(found, abstract_state["params"], where)
      return self._mngr.restore(step, args=ocp.args.StandardRestore(abstract_state))
    state = _read_step(step, step_dir, read)
    bad = first_nonfinite(state)
    if bad is not None:
      raise BrokenCheckpoint(step, step_dir, f"holds non-finite values ({bad})")
    return state

  def restore_latest_intact(self, abstract_state: Any) -> tuple[Any, Optional[int]]:
    """(state, step) of the newest step that reads and is finite; (None, None) without checkpoints.

    Newer broken steps are moved to MODEL_DIR/broken_checkpoints (so that the
    run can save those steps again), each with one line on stderr saying which
    and why. When every step is broken, a UserError names the newest.
    """
    broken = []
    for step in sorted(self._mngr.all_steps(), reverse=True):
      try:
        state = self.restore(abstract_state, step)
      except BrokenCheckpoint as e:
        broken.append(e)
        continue
      self._set_aside(broken, step)
      return state, step
    if broken:
      more = f" (and {len(broken) - 1} older broken steps)" if len(broken) > 1 else ""
      raise UserError(f"no intact checkpoint to resume from: {broken[0]}{more}; move the broken "
                      f"step directories out of {self.directory} to start from scratch")
    return None, None

  def _set_aside(self, broken: list, resumed: int) -> None:
    if not broken:
      return
    root = os.path.join(self.model_dir, BROKEN_SUBDIR)
    for e in broken:
      dest = os.path.join(root, str(e.step))
      n = 1
      while paths.exists(dest):
        dest, n = os.path.join(root, f"{e.step}.{n}"), n + 1
      if jax.process_index() == 0:
        paths.makedirs(root)
        paths.move(e.path, dest)
        print(f"warning: skipped {e}; moved it to {dest}; resuming from step {resumed}",
              file=sys.stderr)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("realign_jax: broken checkpoints set aside")
    self._mngr.reload()

  def wait(self) -> None:
    step, self._pending = self._pending, None
    with self._writing(step) if step is not None else contextlib.nullcontext():
      self._mngr.wait_until_finished()

  def close(self) -> None:
    """Waits for the last save and releases the manager.

    After a write failure already reported, later errors of the manager are
    not reported again (they would replace the one-line error).
    """
    reported = self._failed
    try:
      self.wait()
    except Exception:
      if not reported:
        raise
    finally:
      try:
        self._mngr.close()
      except Exception:
        if not self._failed:
          raise


def _layouts(model_dir: str, abstract_params: Any) -> tuple:
  """(the checkpoint's config, its layout, the layout `abstract_params` is in).

  (None, None, None) without a model.json; the layouts are then not checked.
  """
  if not paths.exists(os.path.join(model_dir, MODEL_JSON)):
    return None, None, None
  config, _ = read_model_json(model_dir)
  try:
    wanted = layout_lib.detect(abstract_params, config)
  except ValueError:
    wanted = None  # another family or model: check_shapes names the first difference
  return config, layout_lib.layout(config), wanted


def load_params(model_dir: str, abstract_params: Any, *, step: Optional[int] = None) -> Any:
  """Loads only the params of a run directory's latest (or given) checkpoint.

  A checkpoint in the other parameter layout (unrolled vs scanned layers, as
  recorded in its model.json) is converted to the layout of
  `abstract_params`, with their shardings.

  Args:
    model_dir: a directory written by `realign_jax.train`.
    abstract_params: tree of jax.ShapeDtypeStruct (with shardings) to restore into.
    step: which step; None = latest.
  """
  if hf_files.is_hf_dir(model_dir):
    from realign_jax.checkpoints.hf import load as hf_load  # NOTE: lazy: Flax (hf.load imports models.api)
    return hf_load.hf_params(model_dir, abstract_params)
  ckpt_dir = os.path.join(model_dir, CHECKPOINT_SUBDIR)
  if not paths.isdir(ckpt_dir):
    raise UserError(f"no checkpoint directory at {ckpt_dir}")
  target = abstract_params
  src_config, src_layout, wanted = _layouts(model_dir, abstract_params)
  convert = wanted is not None and wanted != src_layout
  if convert:
    # NOTE: read in the checkpoint's own layout, then restack on device.
    abstract_params = layout_lib.to_layout(target, src_config, src_layout)
  _quiet_orbax()
  mngr = ocp.CheckpointManager(paths.abspath(ckpt_dir),
                               options=ocp.CheckpointManagerOptions(read_only=True, create=False,
                                                                   save_interval_steps=0),
                               item_handlers=ocp.PyTreeCheckpointHandler())
  try:
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise UserError(f"no checkpoint found in {ckpt_dir}")
    where = f"checkpoint {ckpt_dir} step {step}"
    step_dir = os.path.join(paths.abspath(ckpt_dir), str(step))

    def read():
      found = _params_metadata(mngr, step)
      if found is None:
        raise UserError(f"{where} holds no params")
      check_shapes(found, abstract_params, where)
      # NOTE: restore the params subtree only; optimizer state is skipped.
      return mngr.restore(step, args=ocp.args.PyTreeRestore(
          item={"params": abstract_params},
          restore_args=jax.tree_util.tree_map(
              lambda s: ocp.ArrayRestoreArgs(sharding=getattr(s, "sharding", None),
                                             global_shape=s.shape, dtype=s.dtype),
              {"params": abstract_params}),
          partial_restore=True))
    restored = _read_step(step, step_dir, read)
  except BrokenCheckpoint as e:
    raise UserError(f"{e}; resuming training in {model_dir} falls back to its newest intact "
                    f"step") from e
  finally:
    mngr.close()
  # NOTE: every use of a checkpoint's params (decoding, rewards, init) comes
  # through here: NaN params would give NaN log-probs and scores silently.
  bad = first_nonfinite(restored["params"])
  if bad is not None:
    raise UserError(f"checkpoint step {step} at {step_dir} holds non-finite parameters "
                    f"({bad}); refusing to use it")
  params = restored["params"]
  if convert:
    params = layout_lib.to_layout(params, src_config, wanted)
    shardings = jax.tree_util.tree_map(lambda s: getattr(s, "sharding", None), target)
    params = jax.tree_util.tree_map(
        lambda x, sh: x if sh is None else jax.device_put(x, sh), params, shardings)
  return params


def as_numpy(tree):
  return jax.tree_util.tree_map(np.asarray, tree)
