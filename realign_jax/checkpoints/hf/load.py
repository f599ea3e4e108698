"""Strict import of an HF checkpoint directory into our params.

  config, params = load_hf_checkpoint("/ckpt/flan-t5-base")

Loading is strict: a missing tensor, an unexpected tensor (other than the
harmless extras each family lists, e.g. rotary `inv_freq` buffers or the
encoder/decoder copies of T5's shared embedding; a stored copy of a tied
matrix must equal it) or a shape that disagrees with config.json raises
`UserError` naming the tensor and the file. Parameters come back as host
numpy arrays (float32 unless `dtype` says otherwise), so a caller can
`jax.device_put` them with its own shardings.

`hf_model_config` and `hf_params` are the `read_model_json` / `load_params`
twins for an HF directory (`files.is_hf_dir`), so code that reads run
directories takes one in their place.
"""

import dataclasses
import os
from typing import Union

import jax
import numpy as np

from realign_jax.checkpoints import safetensors
from realign_jax.checkpoints.hf import families, files, t5
from realign_jax.checkpoints.hf import config as config_lib
from realign_jax.checkpoints.hf.tensor_map import (PARAM_DTYPES, Params, Tensor, get_leaf,
                                                   set_leaf, to_param, tree_diff)
from realign_jax.data import hf_tokenizer
from realign_jax.plumbing.errors import UserError
from realign_jax.models import layout as layout_lib
from realign_jax.models.api import LanguageModel
from realign_jax.models.config import ModelConfig, T5Config

DTypeLike = Union[str, np.dtype, type, None]
_Entries = dict[str, safetensors.Entry]


def _resolve_dtype(dtype: DTypeLike) -> tuple[str, np.dtype]:
  if dtype is None:
    return "float32", PARAM_DTYPES["float32"]
  try:
    np_dtype = np.dtype(dtype)
  except TypeError:
    np_dtype = None
  for name, d in PARAM_DTYPES.items():
    if np_dtype == d or dtype == name:
      return name, d
  raise UserError(f"unsupported param dtype {dtype!r} (use one of {', '.join(PARAM_DTYPES)})")


def _preview(names: list[str], k: int = 5) -> str:
  shown = ", ".join(repr(n) for n in names[:k])
  return shown + (f" and {len(names) - k} more" if len(names) > k else "")


def config_of(config_json: dict, config_path: str) -> ModelConfig:
  """`config_from_hf`, its errors naming the file instead of "config.json"; ids as below.

  A directory holding a tokenizer (the first vocabulary file of
  HF_VOCAB_FILES) takes its special ids from the tokenizer's files; they must
  agree with the bos/eos ids config.json states (one line naming both).
  """
  try:
    config = config_lib.config_from_hf(config_json)
  except UserError as e:
    msg = str(e)
    if msg.startswith(files.CONFIG_FILE):
      msg = config_path + msg[len(files.CONFIG_FILE):]
    raise UserError(msg) from None
  tokens = hf_tokenizer.tokenizer_tokens(os.path.dirname(config_path))
  if tokens is None:
    return config
  for name, key in (("eos_id", "eos_token_id"), ("bos_id", "bos_token_id")):
    stated = config_json.get(key)
    if stated is not None and getattr(tokens, name) not in (
        stated if isinstance(stated, list) else [stated]):
      raise UserError(f"{config_path} has {key}={stated} but the tokenizer beside it has "
                      f"{name}={getattr(tokens, name)} ({tokens.describe()})")
  try:
    return dataclasses.replace(config, tokens=tokens)
  except UserError as e:
    raise UserError(f"{config_path}: {e}") from None


def hf_model_config(path: str) -> ModelConfig:
  """The model config of an HF checkpoint directory (float32 params), weights unread.

  The counterpart of `manager.read_model_json` for a directory where
  `is_hf_dir(path)`; its output head is "lm".
  """
  config_path, config_json = files.read_config_json(path)
  return config_of(config_json, config_path)


def hf_params(path: str, abstract_params: Params) -> Params:
  """An HF checkpoint's params placed like `abstract_params` (the `load_params` twin).

  Args:
    path: an HF checkpoint directory (`is_hf_dir`).
    abstract_params: tree of jax.ShapeDtypeStruct, with shardings where the
      caller wants them, of `LanguageModel(hf_model_config(path))`.

  Returns:
    The params as jax arrays, each leaf in its abstract dtype and sharding.
  """
  config, params = load_hf_checkpoint(path)
  # NOTE: HF checkpoints hold layers one by one; a scanned model gets them stacked.
  params = layout_lib.to_layout(params, config, layout_lib.detect(abstract_params, config))
  diff = tree_diff(params, abstract_params)
  if diff:
    raise UserError(f"HF checkpoint {path} does not fit the model it is used for: "
                    + "; ".join(diff[:3]))
  for key, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    # NOTE: as `load_params` refuses a run's non-finite params, so is an HF one refused.
    if not np.isfinite(leaf).all():
      raise UserError(f"HF checkpoint {path} holds non-finite values in parameter "
                      f"{jax.tree_util.keystr(key)}; refusing to use it")

  def place(x, s):
    x = np.asarray(x, dtype=s.dtype)
    sharding = getattr(s, "sharding", None)
    return jax.device_put(x, sharding) if sharding is not None else jax.numpy.asarray(x)
  return jax.tree.map(place, params, abstract_params)


def _stored_names(config: ModelConfig, config_json: dict, specs: list[Tensor],
                  entries: _Entries, source: str) -> dict[str, str]:
  """Our spec's hf_name -> the stored name it is read from; refuses missing tensors."""
  aliases = dict(families.aliases(config))
  if isinstance(config, T5Config) and not config.tie_embeddings:
    aliases["lm_head.weight"] = t5.head_aliases(config_json)
  used: dict[str, str] = {}
  missing = []
  for t in specs:
    name = next((n for n in (t.hf_name, *aliases.get(t.hf_name, ())) if n in entries), None)
    if name is None:
      missing.append(t.hf_name)
    else:
      used[t.hf_name] = name
  if missing:
    raise UserError(f"{source}: missing tensor {_preview(missing)} "
                    f"({len(missing)} missing in all, for {type(config).__name__})")
  return used


def _check_extras(config: ModelConfig, entries: _Entries, used: dict[str, str], source: str,
                  config_path: str) -> list[tuple[str, str]]:
  """Refuses stored tensors the model does not use, unless harmless; returns the tied copies.

  Returns:
    (stored copy, the stored tensor it must equal) of each harmless tied copy.
  """
  harmless = families.harmless(config)
  stored_used = set(used.values())
  unexpected, copies = [], []
  for name in sorted(entries):
    if name in stored_used:
      continue
    rule = next((r for r in harmless if r.match(name)), None)
    if rule is None:
      unexpected.append(name)
    elif rule.shape is not None and entries[name].shape != rule.shape:
      raise UserError(f"{entries[name].file}: tensor {name!r} has shape "
                      f"{list(entries[name].shape)}, expected {list(rule.shape)}")
    elif rule.copy_of is not None:
      copies.append((name, used[rule.copy_of]))
  if unexpected:
    raise UserError(f"{source}: unexpected tensor {_preview(unexpected)} "
                    f"({len(unexpected)} unexpected in all, for {type(config).__name__} "
                    f"from {config_path})")
  return copies


def _check_shapes(specs: list[Tensor], entries: _Entries, used: dict[str, str],
                  config_path: str) -> None:
  """Refuses a used tensor whose shape disagrees with config.json, or that is not float."""
  for t in specs:
    e = entries[used[t.hf_name]]
    if e.shape != t.hf_shape:
      raise UserError(f"{e.file}: tensor {used[t.hf_name]!r} has shape {list(e.shape)}, "
                      f"expected {list(t.hf_shape)} from {config_path}")
    if e.dtype not in safetensors.FLOAT_TAGS:
      raise UserError(f"{e.file}: tensor {used[t.hf_name]!r} has dtype {e.dtype}, expected a "
                      "floating-point dtype")


def _check_copies(copies: list[tuple[str, str]], entries: _Entries, config: ModelConfig,
                  config_json: dict, config_path: str) -> None:
  """Refuses a stored copy of a tied tensor that differs from it."""
  for name, tied in copies:
    # NOTE: HF would silently replace `name` by `tied`; a different stored value
    # means config.json's tying does not describe how the model was trained.
    if not np.array_equal(safetensors.read_entry(entries[name]),
                          safetensors.read_entry(entries[tied])):
      hint = ""
      if name == "lm_head.weight" and isinstance(config, T5Config):
        hint = t5.tie_hint(config_json)
      raise UserError(f"{entries[name].file}: tensor {name!r} differs from {tied!r}, which "
                      f"{config_path} ties it to{hint}")


def _read_params(config: ModelConfig, specs: list[Tensor], entries: _Entries,
                 used: dict[str, str], np_dtype: np.dtype) -> Params:
  """The params tree of the checked tensors, each leaf in the dtype init gives it."""
  want = LanguageModel(config).abstract_init()[0]
  maps: dict[str, np.ndarray] = {}
  params: dict = {}
  for t in specs:
    e = entries[used[t.hf_name]]
    if e.file not in maps:
      maps[e.file] = np.memmap(e.file, dtype=np.uint8, mode="r")
    try:
      # NOTE: the dtype init gives this leaf under param_dtype=`dtype` (the models
      # keep e.g. RMSNorm scales in float32), so params match init exactly.
      leaf_dtype = np.dtype(get_leaf(want, t.path).dtype)
    except (KeyError, TypeError):
      leaf_dtype = np_dtype  # reported by the structure check below
    set_leaf(params, t.path, to_param(t, safetensors.read_entry(e, maps[e.file]), leaf_dtype))
  del maps

  diff = tree_diff(params, want)
  if diff:
    # NOTE: shapes were checked against config.json above, so this is a bug in the
    # name map (or a model change it was not updated for), not bad input.
    raise RuntimeError(f"HF import produced params that do not fit {type(config).__name__}: "
                       + "; ".join(diff[:10]))
  return params


def load_hf_checkpoint(path: str, *, dtype: DTypeLike = None) -> tuple[ModelConfig, Params]:
  """Imports an HF safetensors checkpoint directory.

  Args:
    path: directory with config.json and model.safetensors (or
      model.safetensors.index.json plus its shards).
    dtype: param dtype: "float32" (default), "bfloat16" or "float16" (or the
      numpy/jax dtype). It becomes the returned config's `param_dtype`, and
      every leaf gets the dtype `LanguageModel(config).init` gives it under
      that config (the models currently keep RMSNorm scales in float32).

  Returns:
    (config, params): params is a nested dict of host numpy arrays with
    exactly the structure, shapes and dtypes of
    `LanguageModel(config).init(rng)[0]`.

  Raises:
    UserError: missing/unreadable files, an unsupported config, a missing or
      unexpected tensor, or a tensor whose shape disagrees with config.json.
  """
  config_path, config_json = files.read_config_json(path)
  dtype_name, np_dtype = _resolve_dtype(dtype)
  config = config_of(config_json, config_path)
  config = dataclasses.replace(config, param_dtype=dtype_name)

  entries, source = files.checkpoint_entries(path)
  specs = families.tensors(config)
  used = _stored_names(config, config_json, specs, entries, source)
  copies = _check_extras(config, entries, used, source, config_path)
  _check_shapes(specs, entries, used, config_path)
  _check_copies(copies, entries, config, config_json, config_path)
  return config, _read_params(config, specs, entries, used, np_dtype)
