"""Export of our params as an HF checkpoint directory, written atomically.

  export_hf_checkpoint(config, params, "/out/my-model")

Params keep their dtype (float32, bfloat16 or float16); config.json records
it as `torch_dtype`. The weights are one model.safetensors, or shards named as
transformers names them plus model.safetensors.index.json.
"""

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Optional

import numpy as np

from realign_jax.checkpoints import safetensors
from realign_jax.checkpoints.hf import families, files
from realign_jax.checkpoints.hf import config as config_lib
from realign_jax.checkpoints.hf.tensor_map import (PARAM_DTYPES, Params, from_param, get_leaf,
                                                   tree_diff)
from realign_jax.plumbing.errors import UserError
from realign_jax.models import layout as layout_lib
from realign_jax.models.api import LanguageModel
from realign_jax.models.config import ModelConfig


def hf_state_dict(config: ModelConfig, params: Params) -> dict[str, np.ndarray]:
  """Our params (either layer layout) as HF-named tensors in the HF layout (dtype preserved)."""
  config = dataclasses.replace(config, scan_layers=False)
  params = layout_lib.to_unrolled(params, config)
  want = LanguageModel(config).abstract_init()[0]
  diff = tree_diff(params, want)
  if diff:
    raise UserError(f"params do not fit {type(config).__name__} (export takes the 'lm' head "
                    f"params only): {'; '.join(diff[:10])}")
  return {t.hf_name: from_param(t, np.asarray(get_leaf(params, t.path)))
          for t in families.tensors(config)}


def _shard_plan(tensors: dict[str, np.ndarray], max_shard_bytes: Optional[int]
                ) -> list[list[str]]:
  """Tensor names per shard: in name order, a new shard when the next would pass the limit."""
  names = sorted(tensors)
  if max_shard_bytes is None:
    return [names]
  shards: list[list[str]] = [[]]
  size = 0
  for name in names:
    n = tensors[name].nbytes
    if shards[-1] and size + n > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += n
  return shards


def write_hf_weights(directory: str, tensors: dict[str, np.ndarray],
                     max_shard_bytes: Optional[int] = None) -> list[str]:
  """Writes `tensors` as model.safetensors, or as shards plus model.safetensors.index.json.

  Shards follow transformers' naming (model-00001-of-00003.safetensors); a
  tensor larger than the limit gets a shard of its own. Returns the files
  written.
  """
  plan = _shard_plan(tensors, max_shard_bytes)
  if len(plan) == 1:
    safetensors.write_safetensors(os.path.join(directory, files.SINGLE_FILE), tensors,
                                  metadata={"format": "pt"})
    return [files.SINGLE_FILE]
  written, weight_map = [], {}
  for i, names in enumerate(plan):
    file = f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
    safetensors.write_safetensors(os.path.join(directory, file), {n: tensors[n] for n in names},
                                  metadata={"format": "pt"})
    weight_map.update({n: file for n in names})
    written.append(file)
  index = {"metadata": {"total_size": int(sum(a.nbytes for a in tensors.values()))},
           "weight_map": weight_map}
  with open(os.path.join(directory, files.INDEX_FILE), "w") as f:
    json.dump(index, f, indent=2, sort_keys=True)
    f.write("\n")
  return written + [files.INDEX_FILE]


def export_hf_checkpoint(config: ModelConfig, params: Params, path: str, *,
                         overwrite: bool = False, max_shard_bytes: Optional[int] = None,
                         extra_files: Optional[dict[str, str]] = None) -> None:
  """Writes config.json + model.safetensors in the HF layout, atomically.

  The files go to a temporary directory next to `path` that is then renamed
  to `path`, so readers never see a half-written checkpoint. Params keep
  their dtype (float32, bfloat16 or float16).

  Args:
    config: the model config.
    params: params of `LanguageModel(config)` ("lm" head).
    path: destination directory; must not exist unless `overwrite`.
    overwrite: replace an existing `path`.
    max_shard_bytes: split the weights into shards of at most this many bytes
      (plus an index); None writes one model.safetensors.
    extra_files: name in `path` -> file to copy there (e.g. tokenizer files).
  """
  path = os.path.abspath(path)
  if os.path.lexists(path) and not overwrite:
    raise UserError(f"export destination already exists: {path} (pass overwrite=True)")
  tensors = hf_state_dict(config, params)
  dtypes = {a.dtype for a in tensors.values()}
  names = {v: k for k, v in PARAM_DTYPES.items()}
  torch_dtype = names.get(dtypes.pop(), "float32") if len(dtypes) == 1 else "float32"
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
  try:
    with open(os.path.join(tmp, files.CONFIG_FILE), "w") as f:
      json.dump(config_lib.config_to_hf(config, torch_dtype), f, indent=2, sort_keys=True)
      f.write("\n")
    write_hf_weights(tmp, tensors, max_shard_bytes)
    for name, source in sorted((extra_files or {}).items()):
      shutil.copyfile(source, os.path.join(tmp, name))
    os.chmod(tmp, 0o755)
    files.replace_dir(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
