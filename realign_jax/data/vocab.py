"""Vocabularies: sentencepiece or a Hugging Face tokenizer.json, with their own special ids.

The built-in vocabulary (`builtin/vocab.model`, 2048 unigram pieces trained on
the built-in corpus by `scripts/train_vocab.py`) is the default; any other
sentencepiece model, e.g. T5's 32k vocabulary or a Llama `tokenizer.model`,
is loaded by path. A Hugging Face `tokenizer.json` (a path to the file, or to
a directory holding it) is loaded through the `tokenizers` library; its
bos/eos/pad ids come from the tokenizer's own files (tokenizer_config.json,
special_tokens_map.json, the added tokens of tokenizer.json), a
sentencepiece model's from the model itself: never assumed.

`special_tokens(vocab)` gives them as the `SpecialTokens` the models record;
`check_model_tokens` refuses a vocabulary with more ids than a model's
embedding, or with other special ids than the model's. A tokenizer without a
pad token (Llama, Mistral), or whose pad token is its eos (Zephyr), pads with
its unk id: padding is never a token of a sequence (the sampler masks it), so
it needs an id of its own, and unk is one a trained model does not emit.
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

from realign_jax.data import jsonl
from realign_jax.plumbing import startup
from realign_jax.plumbing.errors import UserError
from realign_jax.models.config import SpecialTokens

# NOTE: T5's ids (the built-in vocabulary's): the defaults of SpecialTokens.
PAD_ID = SpecialTokens().pad_id
EOS_ID = SpecialTokens().eos_id

BUILTIN_DIR = pathlib.Path(__file__).resolve().parent / "builtin"
BUILTIN_VOCAB_PATH = str(BUILTIN_DIR / "vocab.model")


def resolve_vocab_path(path: str | os.PathLike[str] | None) -> str:
  """The absolute path of a vocabulary; None means the built-in one."""
  if path is None:
    return BUILTIN_VOCAB_PATH
  return os.path.abspath(os.path.expanduser(os.fspath(path)))


HF_TOKENIZER_FILE = "tokenizer.json"
HF_SPECIAL_FILES = ("tokenizer_config.json", "special_tokens_map.json")


def is_hf_tokenizer(path: str) -> bool:
  """Whether `path` names a tokenizer.json (the file, or a directory holding it)."""
  return (os.path.basename(path) == HF_TOKENIZER_FILE
          or (os.path.isdir(path) and os.path.isfile(os.path.join(path, HF_TOKENIZER_FILE))))


def _token_content(value) -> str | None:
  """A special token as the HF files spell it: a string or {"content": ...}."""
  if isinstance(value, dict):
    value = value.get("content")
  return value if isinstance(value, str) else None


def hf_special_ids(tokenizer_json: str) -> dict[str, int | None]:
  """{"bos", "eos", "pad"} -> id (None when the tokenizer has no such token).

  The tokens are named in tokenizer_config.json (its `added_tokens_decoder`
  too) or special_tokens_map.json next to `tokenizer_json`; their ids are the
  tokenizer's (its vocabulary or its added tokens).

  Raises:
    UserError: neither file is there, one is not JSON, or a named token is
      not in the tokenizer.
  """
  directory = os.path.dirname(tokenizer_json)
  tok = _load_hf_tokenizer(tokenizer_json)
  names: dict[str, str] = {}
  found = []
  for fname in HF_SPECIAL_FILES:
    fpath = os.path.join(directory, fname)
    if not os.path.isfile(fpath):
      continue
    found.append(fpath)
    doc = jsonl.read_json_object(fpath)
    for role in ("bos", "eos", "pad"):
      content = _token_content(doc.get(f"{role}_token"))
      if content is not None:
        names.setdefault(role, content)  # NOTE: tokenizer_config.json is read first.
  if not found:
    raise UserError(f"no {' or '.join(HF_SPECIAL_FILES)} next to {tokenizer_json}: its eos and "
                    "pad tokens are unknown")
  ids: dict[str, int | None] = {}
  for role in ("bos", "eos", "pad"):
    content = names.get(role)
    if content is None:
      ids[role] = None
      continue
    i = tok.token_to_id(content)
    if i is None:
      raise UserError(f"{found[0]}: {role}_token {content!r} is not a token of {tokenizer_json}")
    ids[role] = i
  return ids


def _hf_unk_id(tokenizer_json: str) -> int | None:
  """The unk id of a tokenizer.json: its files' unk_token, else its model's (None: none)."""
  import json

  tok = _load_hf_tokenizer(tokenizer_json)
  directory = os.path.dirname(tokenizer_json)
  for fname in HF_SPECIAL_FILES:
    fpath = os.path.join(directory, fname)
    if os.path.isfile(fpath):
      try:
        with open(fpath, encoding="utf-8") as f:
          content = _token_content(json.load(f).get("unk_token"))
      except (OSError, ValueError, AttributeError):
        content = None  # NOTE: hf_special_ids reports an unreadable file
      if content is not None and tok.token_to_id(content) is not None:
        return tok.token_to_id(content)
  content = getattr(tok.model, "unk_token", None)
  if isinstance(content, str) and tok.token_to_id(content) is not None:
    return tok.token_to_id(content)
  unk_id = getattr(tok.model, "unk_id", None)  # Unigram
  return unk_id if isinstance(unk_id, int) else None


def special_tokens_from_ids(bos: int | None, eos: int | None, pad: int | None,
                            unk: int | None, where: str) -> SpecialTokens:
  """The `SpecialTokens` of a tokenizer with these ids (None: it has no such token).

  The pad id is the tokenizer's pad unless it has none or it is its eos or
  bos (Zephyr pads with </s>); then its unk (see the module docstring).

  Raises:
    UserError: no eos, or no usable pad and no unk to pad with.
  """
  if eos is None:
    raise UserError(f"{where} names no eos token: responses could never end")
  if pad is None or pad in (eos, bos):
    if unk is None or unk in (eos, bos):
      raise UserError(
          f"{where} has no pad token of its own (pad={pad}, eos={eos}, bos={bos}) and no unk "
          "token to pad with; name one as pad_token in its tokenizer_config.json")
    pad = unk
  return SpecialTokens(pad_id=pad, eos_id=eos, bos_id=bos)


def hf_special_tokens(tokenizer_json: str) -> SpecialTokens:
  """The `SpecialTokens` of a tokenizer.json, from the files beside it."""
  ids = hf_special_ids(tokenizer_json)
  return special_tokens_from_ids(ids["bos"], ids["eos"], ids["pad"], _hf_unk_id(tokenizer_json),
                                 tokenizer_json)


def _sentencepiece_tokens(processor, path: str) -> SpecialTokens:
  none = lambda i: None if i < 0 else i
  return special_tokens_from_ids(none(processor.bos_id()), none(processor.eos_id()),
                                 none(processor.pad_id()), none(processor.unk_id()), path)


def special_tokens_of(path: str | os.PathLike[str] | None) -> SpecialTokens:
  """The `SpecialTokens` of the vocabulary at `path` (None: built-in), read from its files.

  Light: neither seqio nor TensorFlow is imported.
  """
  path = resolve_vocab_path(path)
  if is_hf_tokenizer(path):
    if os.path.isdir(path):
      path = os.path.join(path, HF_TOKENIZER_FILE)
    return hf_special_tokens(path)
  return _sentencepiece_tokens(_load_processor(path), path)


def special_tokens(vocab) -> SpecialTokens:
  """The `SpecialTokens` of a loaded vocabulary (`load_vocabulary`)."""
  tokens = getattr(vocab, "tokens", None)
  if tokens is not None:
    return tokens
  return _sentencepiece_tokens(vocab.tokenizer, getattr(vocab, "sentencepiece_model_file", ""))


@functools.lru_cache(maxsize=8)
def _load_hf_tokenizer(path: str):
  import tokenizers
  try:
    return tokenizers.Tokenizer.from_file(path)
  except FileNotFoundError:
    raise UserError(f"tokenizer file not found: {path}") from None
  except Exception as e:  # the library raises its own Exception for bad JSON
    raise UserError(f"{path} is not a valid Hugging Face tokenizer.json "
                    f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def tokenizer_size(files: dict[str, str]) -> tuple[int | None, str]:
  """(number of token ids, the file it comes from) of an HF directory's tokenizer files.

  `files`: name -> path, e.g. {"tokenizer.json": ...}; tokenizer.json is
  preferred (added tokens included), then spiece.model / tokenizer.model.
  (None, "") when none of them is there.
  """
  if HF_TOKENIZER_FILE in files:
    path = files[HF_TOKENIZER_FILE]
    return _load_hf_tokenizer(path).get_vocab_size(with_added_tokens=True), path
  for name in ("spiece.model", "tokenizer.model"):
    if name in files:
      processor = spm.SentencePieceProcessor()
      try:
        with open(files[name], "rb") as f:
          processor.LoadFromSerializedProto(f.read())
      except (RuntimeError, OSError) as e:
        raise UserError(f"{files[name]} is not a valid sentencepiece model") from e
      return processor.GetPieceSize(), files[name]
  return None, ""


def vocab_file(vocab) -> str:
  """The file a loaded vocabulary was read from."""
  return getattr(vocab, "path", None) or getattr(vocab, "sentencepiece_model_file", "") or "?"


def check_model_vocab_size(vocab, model_vocab_size: int, where: str = "the model") -> None:
  """Refuses a vocabulary with more ids than `model_vocab_size` (both numbers named)."""
  if vocab.vocab_size > model_vocab_size:
    raise UserError(f"vocabulary {vocab_file(vocab)} has {vocab.vocab_size} token ids "
                    f"but {where} has vocab_size={model_vocab_size}")


def check_model_tokens(vocab, config, where: str = "the model") -> SpecialTokens:
  """Refuses a vocabulary that does not fit a model config; returns their SpecialTokens.

  Refused: more token ids than the model's vocab_size, or other special ids
  than the model records (model.json's special_tokens; an HF directory's
  tokenizer files or config.json). Both numbers are named.
  """
  check_model_vocab_size(vocab, config.vocab_size, where)
  mine, theirs = special_tokens(vocab), config.tokens
  for name in ("eos_id", "pad_id", "bos_id"):
    a, b = getattr(mine, name), getattr(theirs, name)
    if a != b:
      raise UserError(f"vocabulary {vocab_file(vocab)} has {name}={a} but {where} records "
                      f"{name}={b} ({theirs.describe()}); decode a model with its own tokenizer")
  return mine


def _hf_vocabulary_class():
  """The seqio.Vocabulary subclass over a tokenizer.json (defined lazily: seqio imports TF)."""
  import seqio

  class HFTokenizerVocabulary(seqio.Vocabulary):
    """A Hugging Face tokenizer.json as a seqio vocabulary.

    `tokenizer` is the `tokenizers.Tokenizer`; `path` the tokenizer.json;
    `special` the bos/eos/pad ids its files name; `tokens` the SpecialTokens
    the pipeline and models use (the pad resolved as `special_tokens_from_ids`).
    Encoding adds no special tokens (the pipeline adds bos and eos itself).
    """

    def __init__(self, path: str, tokenizer, special: dict, tokens: SpecialTokens):
      self.path = path
      self.tokenizer = tokenizer
      self.special = special
      self.tokens = tokens
      super().__init__(extra_ids=0)

    @property
    def eos_id(self):
      return self.tokens.eos_id

    @property
    def pad_id(self):
      return self.tokens.pad_id

    @property
    def unk_id(self):
      return None

    @property
    def bos_id(self):
      return self.special.get("bos")

    @property
    def _base_vocab_size(self):
      return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def _encode(self, s):
      return self.tokenizer.encode(s, add_special_tokens=False).ids

    def _decode(self, ids):
      return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def _encode_tf(self, s):
      import tensorflow as tf

      def enc(x):
        return np.asarray(self._encode(x.numpy().decode("utf-8")), np.int32)
      out = tf.py_function(enc, [s], tf.int32)
      out.set_shape([None])
      return out

    def _decode_tf(self, ids):
      import tensorflow as tf

      def dec(x):
        return self._decode(x.numpy().tolist())
      out = tf.py_function(dec, [ids], tf.string)
      out.set_shape([])
      return out

    def __eq__(self, other):
      return isinstance(other, HFTokenizerVocabulary) and other.path == self.path

    def __hash__(self):
      return hash(self.path)

  return HFTokenizerVocabulary


@functools.lru_cache(maxsize=8)
def _load_hf(path: str):
  if os.path.isdir(path):
    path = os.path.join(path, HF_TOKENIZER_FILE)
  tok = _load_hf_tokenizer(path)
  special = hf_special_ids(path)
  tokens = hf_special_tokens(path)
  startup.import_tensorflow()
  return _hf_vocabulary_class()(path, tok, special, tokens)


@functools.lru_cache(maxsize=8)
def _load_processor(path: str):
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
  return processor


@functools.lru_cache(maxsize=8)
def _load(path: str) -> seqio.SentencePieceVocabulary:
  if is_hf_tokenizer(path):
    return _load_hf(path)
  _sentencepiece_tokens(_load_processor(path), path)  # NOTE: refuses unusable ids up front
  # NOTE: imported here so that modules needing only ids and sentencepiece
  # (rewards, RL) import on hosts without the TensorFlow stack.
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
    path: a sentencepiece `.model` file, a tokenizer.json (or a directory
      holding one); None for the built-in vocabulary.

  Returns:
    The vocabulary (memoised per path).

  Raises:
    UserError: the file is missing, unreadable, not a sentencepiece model,
      or names no eos (or no pad and no unk to pad with).
  """
  return _load(resolve_vocab_path(path))


def _is_hf(vocab) -> bool:
  return hasattr(vocab, "special")


def encode(vocab: seqio.SentencePieceVocabulary, text: str) -> list[int]:
  """Token ids of `text`, without EOS."""
  if _is_hf(vocab):
    return list(vocab.tokenizer.encode(text, add_special_tokens=False).ids)
  return list(vocab.tokenizer.EncodeAsIds(text))


def encode_many(vocab: seqio.SentencePieceVocabulary,
                texts: Sequence[str]) -> list[list[int]]:
  """Token ids of each text, without EOS (batched, in C++)."""
  if not texts:
    return []
  if _is_hf(vocab):
    return [e.ids for e in vocab.tokenizer.encode_batch(list(texts), add_special_tokens=False)]
  return vocab.tokenizer.Encode(list(texts), out_type=int, num_threads=-1)


def decode(vocab: seqio.SentencePieceVocabulary,
           ids: Iterable[int] | np.ndarray) -> str:
  """Text of `ids`, up to the first EOS; pad ids (and bos) are ignored; all the vocabulary's own.

  Args:
    vocab: the vocabulary.
    ids: token ids, e.g. one row of a `[batch, length]` array.

  Returns:
    The decoded text.
  """
  tokens = special_tokens(vocab)
  if _is_hf(vocab):
    clean = []
    for i in np.asarray(ids).reshape(-1).tolist():
      if i == tokens.eos_id:
        break
      if i != tokens.pad_id and 0 <= i < vocab.vocab_size:  # NOTE: ids past the tokenizer: dropped
        clean.append(i)
    return vocab.tokenizer.decode(clean, skip_special_tokens=True)
  size = vocab.tokenizer.GetPieceSize()
  unk = vocab.tokenizer.unk_id()
  clean = []
  for i in np.asarray(ids).reshape(-1).tolist():
    if i == tokens.eos_id:
      break
    if i == tokens.pad_id:
      continue
    clean.append(i if 0 <= i < size else unk)
  return vocab.tokenizer.DecodeIds(clean)
