"""The tokenizer of an HF checkpoint directory: which file it is, its special ids.

An HF directory's vocabulary is the first of `HF_VOCAB_FILES` it holds; a
tokenizer.json and a tokenizer.model beside it are the fast and slow forms of
one tokenizer. `hf_vocabulary` records it as model.json does
(`{"path", "sha256"}`), `tokenizer_tokens` reads its special ids.
"""

import hashlib
import os
from typing import Optional

from realign_jax.data import vocab as vocab_lib
from realign_jax.plumbing.errors import UserError
from realign_jax.models.config import SpecialTokens

# The vocabulary file of an HF directory, in order of preference.
HF_VOCAB_FILES = ("spiece.model", "tokenizer.model", "tokenizer.json")


def tokenizer_tokens(path: str) -> Optional[SpecialTokens]:
  """The SpecialTokens of an HF directory's tokenizer files.

  None: no tokenizer, or a tokenizer.json whose special tokens no file names
  (config.json's ids are then the model's).
  """
  for name in HF_VOCAB_FILES:
    file = os.path.join(path, name)
    if not os.path.isfile(file):
      continue
    if name == vocab_lib.HF_TOKENIZER_FILE and not any(
        os.path.isfile(os.path.join(path, f)) for f in vocab_lib.HF_SPECIAL_FILES):
      return None
    return vocab_lib.special_tokens_of(file)
  return None


def _record(file: str) -> dict:
  try:
    with open(file, "rb") as f:
      return {"path": file, "sha256": hashlib.sha256(f.read()).hexdigest()}
  except OSError as e:
    raise UserError(f"cannot read {file}: {e.strerror}") from None


def hf_vocabularies(path: str) -> list[dict]:
  """{"path", "sha256"} of every vocabulary file an HF directory holds (HF_VOCAB_FILES order).

  Each is the directory's vocabulary: a tokenizer.json and a tokenizer.model
  beside it are the fast and slow forms of one tokenizer.
  """
  return [_record(os.path.join(path, name)) for name in HF_VOCAB_FILES
          if os.path.isfile(os.path.join(path, name))]


def hf_vocabulary(path: str) -> Optional[dict]:
  """{"path", "sha256"} of an HF directory's vocabulary file, as model.json records one.

  The counterpart of `run_dir.recorded_vocabulary` for an HF directory: the
  first of spiece.model, tokenizer.model, tokenizer.json that it holds; None
  when it holds none.
  """
  for name in HF_VOCAB_FILES:
    file = os.path.join(path, name)
    if os.path.isfile(file):
      return _record(file)
  return None
