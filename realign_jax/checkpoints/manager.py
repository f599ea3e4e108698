"""The one checkpoint path: orbax CheckpointManager under `MODEL_DIR/checkpoints`.

A run directory also holds `model.json` (the family and config of the model
its checkpoints belong to), so the decoder and later stages can rebuild the
model from the directory alone and refuse mismatching ones before compute.

Orbax writes each step to a temporary directory and renames it when complete,
so a run killed mid-save leaves the previous checkpoint as the latest.
"""

import dataclasses
import json
import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from realign_jax.errors import UserError
from realign_jax.models.config import DecoderConfig, ModelConfig, T5Config

CHECKPOINT_SUBDIR = "checkpoints"
MODEL_JSON = "model.json"


def atomic_write_text(path: str, text: str) -> None:
  """Writes `text` to a temporary file, then renames it: `path` appears only complete."""
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def atomic_write_jsonl(path: str, rows) -> None:
  """One JSON object per line, written atomically (see `atomic_write_text`)."""
  atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


# ---- model description ------------------------------------------------------
def write_model_json(model_dir: str, config: ModelConfig, output_head: str = "lm") -> None:
  os.makedirs(model_dir, exist_ok=True)
  doc = {"family": config.family, "output_head": output_head,
         "config": dataclasses.asdict(config)}
  atomic_write_text(os.path.join(model_dir, MODEL_JSON), json.dumps(doc, indent=2))


def read_model_json(model_dir: str) -> tuple[ModelConfig, str]:
  path = os.path.join(model_dir, MODEL_JSON)
  if not os.path.exists(path):
    raise UserError(f"{path} not found: not a run directory written by realign_jax.train")
  try:
    doc = json.load(open(path))
    cls = {"t5": T5Config, "decoder": DecoderConfig}[doc["family"]]
    return cls(**doc["config"]), doc.get("output_head", "lm")
  except (KeyError, TypeError, ValueError) as e:
    raise UserError(f"{path} is malformed: {e}") from e


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


# ---- manager ----------------------------------------------------------------
class Checkpointer:
  """Save every N steps and at the end, keep K, restore the latest."""

  def __init__(self, model_dir: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(os.path.join(model_dir, CHECKPOINT_SUBDIR))
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save,
                                           cleanup_tmp_directories=True)
    self._mngr = ocp.CheckpointManager(self.directory, options=options,
                                       item_handlers=ocp.StandardCheckpointHandler())

  def latest_step(self) -> Optional[int]:
    return self._mngr.latest_step()

  def save(self, step: int, state: Any) -> None:
    self._mngr.save(step, args=ocp.args.StandardSave(state), force=True)

  def restore(self, abstract_state: Any, step: Optional[int] = None) -> Any:
    """Restores into the shapes and shardings of `abstract_state` (ShapeDtypeStructs)."""
    step = self.latest_step() if step is None else step
    where = f"checkpoint {self.directory} step {step}"
    found = _params_metadata(self._mngr, step)
    if found is not None and "params" in abstract_state:
      check_shapes(found, abstract_state["params"], where)
    return self._mngr.restore(step, args=ocp.args.StandardRestore(abstract_state))

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()


def load_params(model_dir: str, abstract_params: Any, *, step: Optional[int] = None) -> Any:
  """Loads only the params of a run directory's latest (or given) checkpoint.

  Args:
    model_dir: a directory written by `realign_jax.train`.
    abstract_params: tree of jax.ShapeDtypeStruct (with shardings) to restore into.
    step: which step; None = latest.
  """
  ckpt_dir = os.path.join(model_dir, CHECKPOINT_SUBDIR)
  if not os.path.isdir(ckpt_dir):
    raise UserError(f"no checkpoint directory at {ckpt_dir}")
  mngr = ocp.CheckpointManager(os.path.abspath(ckpt_dir),
                               options=ocp.CheckpointManagerOptions(read_only=True, create=False,
                                                                   save_interval_steps=0),
                               item_handlers=ocp.PyTreeCheckpointHandler())
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise UserError(f"no checkpoint found in {ckpt_dir}")
  where = f"checkpoint {ckpt_dir} step {step}"
  found = _params_metadata(mngr, step)
  if found is None:
    raise UserError(f"{where} holds no params")
  check_shapes(found, abstract_params, where)
  # NOTE: restore the params subtree only; optimizer state is skipped.
  restored = mngr.restore(step, args=ocp.args.PyTreeRestore(
      item={"params": abstract_params},
      restore_args=jax.tree_util.tree_map(
          lambda s: ocp.ArrayRestoreArgs(sharding=getattr(s, "sharding", None),
                                         global_shape=s.shape, dtype=s.dtype),
          {"params": abstract_params}),
      partial_restore=True))
  mngr.close()
  return restored["params"]


def as_numpy(tree):
  return jax.tree_util.tree_map(np.asarray, tree)
