"""The files of an HF checkpoint directory: config.json, the weights, their index.

A directory holds `config.json` and either `model.safetensors` or
`model.safetensors.index.json` (its "weight_map": tensor name -> shard file)
next to the shards. `is_hf_dir` lets code that reads run directories take an
HF directory in their place.
"""

import json
import os
import shutil
import tempfile

from realign_jax.checkpoints import safetensors
from realign_jax.plumbing.errors import UserError

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def is_hf_dir(path: str) -> bool:
  """Whether `path` is an HF checkpoint directory (config.json + safetensors weights).

  A run directory written by realign_jax (it has model.json) is not one, even
  if it also holds HF files.
  """
  return (os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG_FILE))
          and not os.path.exists(os.path.join(path, "model.json"))
          and (os.path.isfile(os.path.join(path, SINGLE_FILE))
               or os.path.isfile(os.path.join(path, INDEX_FILE))))


def read_config_json(path: str) -> tuple[str, dict]:
  """(path of config.json, its parsed contents) of an HF checkpoint directory."""
  if not os.path.isdir(path):
    raise UserError(f"HF checkpoint directory not found: {path}")
  config_path = os.path.join(path, CONFIG_FILE)
  try:
    with open(config_path) as f:
      return config_path, json.load(f)
  except FileNotFoundError:
    raise UserError(f"no {CONFIG_FILE} in HF checkpoint directory {path}: {config_path}") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f"{config_path}: invalid JSON ({e})") from None


def checkpoint_entries(path: str) -> tuple[dict[str, safetensors.Entry], str]:
  """Headers of a checkpoint directory: (name -> entry, description of the files)."""
  single = os.path.join(path, SINGLE_FILE)
  index = os.path.join(path, INDEX_FILE)
  if os.path.isfile(single):
    return safetensors.read_header(single), single
  if not os.path.isfile(index):
    others = sorted(f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".h5", ".msgpack")))
    hint = (f" (found {', '.join(others)}: only safetensors is supported; re-save the model "
            "with safe_serialization=True)") if others else ""
    raise UserError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}{hint}")
  try:
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    if not isinstance(weight_map, dict):
      raise TypeError("weight_map is not an object")
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise UserError(f"{index}: malformed safetensors index ({e!r})") from None
  headers: dict[str, dict[str, safetensors.Entry]] = {}
  entries = {}
  for name, shard in weight_map.items():
    shard_path = os.path.join(path, shard)
    if shard not in headers:
      if not os.path.isfile(shard_path):
        raise UserError(f"{index} maps tensor {name!r} to {shard}, which does not exist in {path}")
      headers[shard] = safetensors.read_header(shard_path)
    if name not in headers[shard]:
      raise UserError(f"{index} maps tensor {name!r} to {shard_path}, which does not contain it")
    entries[name] = headers[shard][name]
  return entries, index


def replace_dir(tmp: str, path: str) -> None:
  """Renames the complete directory `tmp` to `path`; an old `path` is moved away first."""
  parent = os.path.dirname(path)
  if os.path.lexists(path):
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
    os.rename(path, os.path.join(old, "x"))
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.rename(tmp, path)
