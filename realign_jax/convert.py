r"""Conversion binary: Hugging Face checkpoint directories <-> run directories.

  python -m realign_jax.convert --hf_dir=flan-t5-base --model_dir=runs/flan-t5-base
  python -m realign_jax.convert --model_dir=runs/sft --hf_dir=export/sft --to_hf \
      --dtype=bfloat16 --max_shard_size=2GB

From HF (the default direction): reads config.json and the safetensors weights
(T5.1.1/flan-t5, Llama, Mistral; transformers 4.x and 5.x layouts) and writes
a run directory: model.json, the params as an orbax checkpoint at step 0 (what
`load_params` reads, so INIT_CHECKPOINT, REF_CHECKPOINT, ALIGNED_CHECKPOINT and
the other checkpoint bindings accept it) and the tokenizer files copied in.

To HF (`--to_hf`): reads a run directory's latest checkpoint (language-model
head only) and writes config.json, the weights (one model.safetensors, or
shards of at most `--max_shard_size` plus model.safetensors.index.json) and
the tokenizer files the run directory holds.

Either way the destination is written into a temporary directory next to it
and renamed into place when complete: an error leaves nothing behind. An
existing destination is refused unless `--overwrite`.
"""

import argparse
import os
import re
import shutil
import sys
import tempfile
from typing import Optional

from realign_jax.plumbing import startup
from realign_jax.models.config import T5Config
from realign_jax.plumbing.errors import UserError

# Tokenizer files of an HF directory, copied along in both directions.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "spiece.model", "tokenizer.model",
                   "generation_config.json")
_DTYPES = ("float32", "bfloat16")
_UNITS = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9,
          "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30}


def parse_size(text: str) -> int:
  """Bytes of "5GB", "500MB", "2GiB" or "123456" (transformers' max_shard_size spelling)."""
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
  unit = m.group(2).upper() if m else None
  if m is None or unit not in _UNITS or float(m.group(1)) * _UNITS[unit] < 1:
    raise UserError(f"--max_shard_size={text!r} is not a size (use e.g. 5GB, 500MB, 2GiB or a "
                    "number of bytes)")
  return int(float(m.group(1)) * _UNITS[unit])


def _check_destination(path: str, overwrite: bool, flag: str) -> str:
  path = os.path.abspath(path)
  if os.path.lexists(path) and not overwrite:
    raise UserError(f"{flag}={path} already exists (pass --overwrite to replace it)")
  if os.path.lexists(path) and not os.path.isdir(path):
    raise UserError(f"{flag}={path} exists and is not a directory")
  parent = os.path.dirname(path)
  if os.path.exists(parent) and not os.path.isdir(parent):
    raise UserError(f"{flag}={path}: its parent {parent} is not a directory")
  return path


def tokenizer_files(directory: str) -> dict[str, str]:
  """name -> path of the tokenizer files present in `directory`."""
  return {n: os.path.join(directory, n) for n in TOKENIZER_FILES
          if os.path.isfile(os.path.join(directory, n))}


def hf_to_run_dir(hf_dir: str, model_dir: str, *, dtype: str = "float32",
                  overwrite: bool = False) -> str:
  """Writes a run directory for the HF checkpoint in `hf_dir`; returns its path."""
  # NOTE: lazy: argument errors come before JAX loads, and it loads after `startup.configure`.
  import jax
  from realign_jax.checkpoints import manager
  from realign_jax.checkpoints import run_dir
  from realign_jax.checkpoints.hf import files as hf_files
  from realign_jax.checkpoints.hf import load as hf_load
  from realign_jax.data import hf_tokenizer

  model_dir = _check_destination(model_dir, overwrite, "--model_dir")
  config, params = hf_load.load_hf_checkpoint(hf_dir, dtype=dtype)
  files = tokenizer_files(hf_dir)
  _check_tokenizer(files, config.vocab_size, hf_dir)
  parent = os.path.dirname(model_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(model_dir)}.tmp-", dir=parent)
  try:
    for name, source in files.items():
      shutil.copyfile(source, os.path.join(tmp, name))
    vocab = hf_tokenizer.hf_vocabulary(tmp)
    if vocab is not None:  # NOTE: named where it is after the rename
      vocab["path"] = os.path.join(model_dir, os.path.basename(vocab["path"]))
    ckpt = manager.Checkpointer(tmp, keep=1, async_save=False)
    # NOTE: host numpy leaves: orbax writes them without a copy on an accelerator,
    # and `load_params` restores them with whatever shardings its caller asks.
    try:
      ckpt.save(0, {"step": jax.numpy.zeros((), jax.numpy.int32),
                    "params": params})
    finally:
      ckpt.close()
    run_dir.write_model_json(tmp, config, "lm", vocab=vocab)
    os.chmod(tmp, 0o755)
    hf_files.replace_dir(tmp, model_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return model_dir


def run_dir_to_hf(model_dir: str, hf_dir: str, *, dtype: str = "float32",
                  max_shard_bytes: Optional[int] = None, overwrite: bool = False) -> str:
  """Writes the HF checkpoint of a run directory's latest params; returns its path."""
  # NOTE: lazy, as in hf_to_run_dir.
  import jax
  import ml_dtypes
  import numpy as np
  from realign_jax.checkpoints import manager
  from realign_jax.checkpoints.hf import export as hf_export
  from realign_jax.models.api import LanguageModel

  hf_dir = _check_destination(hf_dir, overwrite, "--hf_dir")
  config, head = manager.read_model_json(model_dir)
  if head != "lm":
    raise UserError(f"{os.path.join(model_dir, manager.MODEL_JSON)}: output_head={head!r}; only "
                    "language models (output_head 'lm') have an HF layout")
  # NOTE: restored whole onto one device (orbax wants a sharding for each leaf).
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=one),
                          LanguageModel(config).abstract_init()[0])
  params = manager.load_params(model_dir, abstract)
  target = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}[dtype]
  params = jax.tree.map(lambda x: np.asarray(x).astype(target), params)
  files = tokenizer_files(model_dir)
  if not files:
    files = _recorded_sentencepiece(model_dir, config)
  hf_export.export_hf_checkpoint(config, params, hf_dir, overwrite=overwrite,
                                 max_shard_bytes=max_shard_bytes, extra_files=files)
  return hf_dir


def _recorded_sentencepiece(model_dir: str, config) -> dict[str, str]:
  """The sentencepiece model a run recorded in model.json, under its HF file name.

  A run trained with a sentencepiece vocabulary (the built-in one included)
  has no tokenizer files of its own; the file model.json names goes along as
  spiece.model (T5) or tokenizer.model (decoder-only) when its hash still
  matches. Anything else is said on stderr, not guessed.
  """
  import hashlib
  # NOTE: lazy, as in hf_to_run_dir (run_dir loads JAX; vocab numpy).
  from realign_jax.checkpoints import run_dir
  from realign_jax.data import vocab as vocab_lib

  recorded = run_dir.recorded_vocabulary(model_dir)
  if not recorded or not recorded.get("path"):
    print(f"note: {model_dir} names no vocabulary; the HF directory gets no tokenizer files",
          file=sys.stderr)
    return {}
  path = (vocab_lib.BUILTIN_VOCAB_PATH if recorded["path"] == run_dir.BUILTIN_VOCAB
          else recorded["path"])
  try:
    with open(path, "rb") as f:
      digest = hashlib.sha256(f.read()).hexdigest()
  except OSError as e:
    print(f"note: the run's vocabulary {path} is unreadable ({e.strerror}); the HF directory "
          "gets no tokenizer files", file=sys.stderr)
    return {}
  if digest != recorded.get("sha256") or not path.endswith(".model"):
    print(f"note: {path} is not the sentencepiece model the run recorded; the HF directory "
          "gets no tokenizer files", file=sys.stderr)
    return {}
  return {"spiece.model" if isinstance(config, T5Config) else "tokenizer.model": path}


def _check_tokenizer(files: dict[str, str], model_vocab: int, hf_dir: str) -> None:
  """Refuses a tokenizer with more ids than the model's embedding has rows."""
  if not files:
    return
  from realign_jax.data import vocab as vocab_lib  # NOTE: lazy: numpy, sentencepiece
  size, where = vocab_lib.tokenizer_size(files)
  if size is not None and size > model_vocab:
    raise UserError(f"{where} has {size} token ids but the model in {hf_dir} has "
                    f"vocab_size={model_vocab}: they do not belong together")


class _Parser(argparse.ArgumentParser):
  """Bad arguments: one line (`error: ...`, exit 2), as the other binaries."""

  def error(self, message):
    self.exit(2, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
  p = _Parser(
      prog="python -m realign_jax.convert",
      description="Convert a Hugging Face checkpoint directory to a realign_jax run directory, "
                  "or (with --to_hf) a run directory back to a Hugging Face directory.")
  p.add_argument("--hf_dir", required=True,
                 help="HF directory: config.json + model.safetensors or sharded safetensors "
                      "(read, or written with --to_hf)")
  p.add_argument("--model_dir", required=True,
                 help="run directory (written, or read with --to_hf)")
  p.add_argument("--to_hf", action="store_true", help="convert the run directory to HF")
  p.add_argument("--dtype", default="float32", choices=_DTYPES,
                 help="parameter dtype written (default float32)")
  p.add_argument("--max_shard_size", default=None,
                 help="with --to_hf: split the weights into safetensors shards of at most this "
                      "size, e.g. 5GB (default: one file)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing destination")
  p.add_argument("--verbosity", type=int, default=startup.DEFAULT_VERBOSITY,
                 help="-1 warnings only (default), 0 informational, 1 debug")
  return p


def main(argv: list[str]) -> int:
  args = build_parser().parse_args(argv)
  startup.configure(args.verbosity)
  try:
    if args.to_hf:
      shard = None if args.max_shard_size is None else parse_size(args.max_shard_size)
      out = run_dir_to_hf(args.model_dir, args.hf_dir, dtype=args.dtype,
                          max_shard_bytes=shard, overwrite=args.overwrite)
    else:
      if args.max_shard_size is not None:
        raise UserError("--max_shard_size applies to --to_hf only")
      out = hf_to_run_dir(args.hf_dir, args.model_dir, dtype=args.dtype,
                          overwrite=args.overwrite)
  except UserError as e:
    print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
    return 2
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
