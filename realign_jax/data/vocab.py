"""Sentencepiece vocabularies with T5/seqio ids (pad 0, eos 1).

The built-in vocabulary (`builtin/vocab.model`, 2048 unigram pieces trained on
the built-in corpus by `scripts/train_vocab.py`) is the default; any other
sentencepiece model with the same special ids, e.g. T5's 32k vocabulary, is
loaded by path.
"""

from __future__ import annotations

import functools
import os
import pathlib
from typing import Iterable, Sequence

import typing

import numpy as np
import sentencepiece as spm

if typing.TYPE_CHECKING:
  import seqio

from realign_jax.errors import UserError

PAD_ID = 0
EOS_ID = 1

BUILTIN_DIR = pathlib.Path(__file__).resolve().parent / "builtin"
BUILTIN_VOCAB_PATH = str(BUILTIN_DIR / "vocab.model")


def resolve_vocab_path(path: str | os.PathLike[str] | None) -> str:
  """The absolute path of a vocabulary; None means the built-in one."""
  if path is None:
    return BUILTIN_VOCAB_PATH
  return os.path.abspath(os.path.expanduser(os.fspath(path)))


@functools.lru_cache(maxsize=8)
def _load(path: str) -> seqio.SentencePieceVocabulary:
  try:
    with open(path, "rb") as f:
      proto = f.read()
  except OSError as e:
    raise UserError(f"cannot read vocabulary {path}: {e.strerror}") from e
  processor = spm.SentencePieceProcessor()
  try:
    processor.LoadFromSerializedProto(proto)
  except (RuntimeError, OSError) as e:
    raise UserError(
        f"vocabulary {path} is not a valid sentencepiece model") from e
  if processor.pad_id() != PAD_ID or processor.eos_id() != EOS_ID:
    raise UserError(
        f"vocabulary {path} has pad_id={processor.pad_id()} and "
        f"eos_id={processor.eos_id()}; T5/seqio ids pad_id={PAD_ID} and "
        f"eos_id={EOS_ID} are required")
  # NOTE: imported here so that modules needing only ids and sentencepiece
  # (rewards, RL) import on hosts without the TensorFlow stack.
  from realign_jax import startup
  startup.import_tensorflow()
  import seqio
  vocab = seqio.SentencePieceVocabulary(path)
  # NOTE: seqio loads lazily; touch the model now so a later failure cannot
  # surface deep inside a tf.data pipeline.
  _ = vocab.tokenizer
  return vocab


def load_vocabulary(
    path: str | os.PathLike[str] | None = None,
) -> seqio.SentencePieceVocabulary:
  """Loads a sentencepiece vocabulary.

  Args:
    path: a sentencepiece `.model` file; None for the built-in vocabulary.

  Returns:
    The vocabulary (memoised per path).

  Raises:
    UserError: the file is missing, unreadable, not a sentencepiece model, or
      its pad/eos ids are not 0/1.
  """
  return _load(resolve_vocab_path(path))


def encode(vocab: seqio.SentencePieceVocabulary, text: str) -> list[int]:
  """Token ids of `text`, without EOS."""
  return list(vocab.tokenizer.EncodeAsIds(text))


def encode_many(vocab: seqio.SentencePieceVocabulary,
                texts: Sequence[str]) -> list[list[int]]:
  """Token ids of each text, without EOS (batched, in C++)."""
  if not texts:
    return []
  return vocab.tokenizer.Encode(list(texts), out_type=int, num_threads=-1)


def decode(vocab: seqio.SentencePieceVocabulary,
           ids: Iterable[int] | np.ndarray) -> str:
  """Text of `ids`, up to the first EOS; pad ids are ignored.

  Args:
    vocab: the vocabulary.
    ids: token ids, e.g. one row of a `[batch, length]` array.

  Returns:
    The decoded text.
  """
  size = vocab.tokenizer.GetPieceSize()
  unk = vocab.tokenizer.unk_id()
  clean = []
  for i in np.asarray(ids).reshape(-1).tolist():
    if i == EOS_ID:
      break
    if i == PAD_ID:
      continue
    clean.append(i if 0 <= i < size else unk)
  return vocab.tokenizer.DecodeIds(clean)
