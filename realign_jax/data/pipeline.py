"""Fixed-shape numpy batches for the trainer and the binaries.

A split is read once through its seqio task, encoded with the vocabulary in
numpy and held in memory. The special ids are the vocabulary's own
(`vocab.special_tokens`, T5's pad 0 / eos 1 for the built-in one). Every
target is `encode(text)` cut to `length - 1` tokens, then EOS, then
right-padded with pad; every prompt is the same for a tokenizer without BOS
(T5, the built-in vocabulary) and BOS followed by `encode(text)` cut to
`length - 1` tokens, without EOS, for a tokenizer with one (Llama, Mistral:
such decoder-only models continue their prompt, as they were trained to):

  summarisation tasks:  {"inputs": [batch, input_length],
                         "targets": [batch, target_length]}
  preference tasks:     {"inputs": [batch, input_length]      (the prompt),
                         "chosen": [batch, target_length],
                         "rejected": [batch, target_length]}

all int32. Both model families use the same prompt: T5 encodes it, a
decoder-only model trained here reads its EOS as the separator before the
response.

Training order is a function of (seed, step) alone: example position
`p = step * batch_size + i` of the endless stream is example
`permutation(seed, p // n)[p % n]` of the split, with one permutation per
epoch from `np.random.default_rng((seed, epoch))`. Resuming at `start_step`
is therefore O(1) and yields exactly the batches a fresh iterator would.
"""

from __future__ import annotations

import functools
import itertools
import os
from typing import Iterator, Mapping, Sequence

import typing

import numpy as np

from realign_jax.data import vocab as vocab_lib
from realign_jax.plumbing.errors import UserError
from realign_jax.models.config import SpecialTokens

if typing.TYPE_CHECKING:
  import seqio

Batch = dict[str, np.ndarray]

# Task feature -> batch key (the prompt of a preference pair is the input).
_BATCH_KEYS = {"inputs": "inputs", "targets": "targets", "prompt": "inputs",
               "chosen": "chosen", "rejected": "rejected"}


def _tasks():
  # NOTE: lazy: the task registry pulls in seqio and TensorFlow (seconds to import);
  # imported on first use so a binary that never reads a split, or stops on a
  # user error, does not pay for it.
  from realign_jax.data import tasks  # pylint: disable=g-import-not-at-top
  return tasks


def _check_shard(shard_index: int, num_shards: int) -> None:
  if num_shards < 1 or not 0 <= shard_index < num_shards:
    raise UserError(f"bad data shard {shard_index} of {num_shards}: need "
                    "0 <= shard_index < num_shards")


@functools.lru_cache(maxsize=16)
def _cached_texts(task: str, split: str, data_dir: str | None,
                  vocab_path: str | None) -> tuple[dict[str, str], ...]:
  tasks = _tasks()
  seqio_task = tasks.get_task(task, data_dir=data_dir, vocab_path=vocab_path)
  features = tasks.task_features(task)
  rows = []
  for example in tasks.text_dataset(seqio_task, split).as_numpy_iterator():
    rows.append({f: example[f].decode("utf-8") for f in features})
  return tuple(rows)


def text_examples(
    task: str, split: str, *, data_dir: str | os.PathLike[str] | None = None,
    limit: int | None = None, shard_index: int = 0, num_shards: int = 1,
) -> list[dict[str, str]]:
  """The raw text examples of a split, in a fixed order.

  Args:
    task: a task name (see `tasks.TASK_NAMES`).
    split: "train", "validation" or "test".
    data_dir: the task's data directory (None: its default).
    limit: keep only the first `limit` examples of the split.
    shard_index: keep every `num_shards`-th example, from this one
      (after `limit`).
    num_shards: number of shards.

  Returns:
    {"inputs", "targets"} dicts for summarisation tasks, {"prompt", "chosen",
    "rejected"} for preference tasks.
  """
  _check_shard(shard_index, num_shards)
  resolved = _tasks().resolve_data_dir(task, data_dir)
  rows = _cached_texts(task, split, resolved, None)
  if limit is not None:
    rows = rows[:limit]
  return [dict(r) for r in rows[shard_index::num_shards]]


_T5 = SpecialTokens()


def fit(ids: Sequence[Sequence[int]], length: int, tokens: SpecialTokens = _T5) -> np.ndarray:
  """Targets: truncates to `length - 1` tokens, appends EOS, right-pads with pad.

  Args:
    ids: token ids per example, without EOS.
    length: the fixed length (>= 1).
    tokens: the special ids (default T5's).

  Returns:
    `[len(ids), length]` int32.
  """
  if length < 1:
    raise UserError(f"sequence length must be >= 1, got {length}")
  out = np.full((len(ids), length), tokens.pad_id, dtype=np.int32)
  for row, seq in enumerate(ids):
    seq = list(seq)[:length - 1]
    out[row, :len(seq)] = seq
    out[row, len(seq)] = tokens.eos_id
  return out


def fit_prompts(ids: Sequence[Sequence[int]], length: int, tokens: SpecialTokens = _T5, *,
                add_bos: bool = True) -> np.ndarray:
  """Prompts (see the module docstring): as `fit` without BOS, BOS + ids[:length - 1] with one.

  `add_bos=False`: the ids already say where BOS goes (a rendered chat
  template), so none is added, and none EOS either when the tokenizer has a BOS.
  """
  if tokens.bos_id is None:
    return fit(ids, length, tokens)
  if length < 1:
    raise UserError(f"sequence length must be >= 1, got {length}")
  out = np.full((len(ids), length), tokens.pad_id, dtype=np.int32)
  head = [tokens.bos_id] if add_bos else []
  for row, seq in enumerate(ids):
    seq = (head + list(seq))[:length]
    out[row, :len(seq)] = seq
  return out


def encode_pair(vocab: seqio.SentencePieceVocabulary, inputs: str,
                targets: str, input_length: int,
                target_length: int) -> dict[str, np.ndarray]:
  """One example: {"inputs": [input_length], "targets": [target_length]}."""
  tokens = vocab_lib.special_tokens(vocab)
  return {"inputs": fit_prompts([vocab_lib.encode(vocab, inputs)], input_length, tokens)[0],
          "targets": fit([vocab_lib.encode(vocab, targets)], target_length, tokens)[0]}


def encode_batch(vocab: seqio.SentencePieceVocabulary,
                 examples: Sequence[Mapping[str, str]], *, input_length: int,
                 target_length: int) -> Batch:
  """Encodes text examples to fixed-shape int32 arrays.

  Args:
    vocab: the vocabulary.
    examples: {"inputs", "targets"} or {"prompt", "chosen", "rejected"}.
    input_length: length of "inputs" (the document or prompt).
    target_length: length of "targets", "chosen" and "rejected".

  Returns:
    Arrays `[len(examples), length]` keyed as in the module docstring.
  """
  if not examples:
    raise UserError("cannot encode an empty list of examples")
  out = {}
  tokens = vocab_lib.special_tokens(vocab)
  for feature in examples[0]:
    key = _BATCH_KEYS.get(feature)
    if key is None:
      raise UserError(f"unknown text feature {feature!r}; expected "
                      f"{', '.join(_BATCH_KEYS)}")
    length = input_length if key == "inputs" else target_length
    texts = [e[feature] for e in examples]
    ids = vocab_lib.encode_many(vocab, texts)
    out[key] = fit_prompts(ids, length, tokens) if key == "inputs" else fit(ids, length, tokens)
  return out


@functools.lru_cache(maxsize=8)
def _encoded(task: str, split: str, data_dir: str | None,
             vocab_path: str | None, input_length: int, target_length: int,
             limit: int | None, shard_index: int, num_shards: int) -> Batch:
  rows = text_examples(task, split, data_dir=data_dir, limit=limit,
                       shard_index=shard_index, num_shards=num_shards)
  if not rows:
    raise UserError(f"task {task} split {split} has no examples"
                    + (f" in shard {shard_index} of {num_shards}"
                       if num_shards > 1 else ""))
  vocab = vocab_lib.load_vocabulary(vocab_path)
  arrays = encode_batch(vocab, rows, input_length=input_length,
                        target_length=target_length)
  for array in arrays.values():
    array.flags.writeable = False
  return arrays


def encoded_split(
    task: str, split: str, *, input_length: int, target_length: int,
    data_dir: str | os.PathLike[str] | None = None,
    vocab_path: str | os.PathLike[str] | None = None,
    limit: int | None = None, shard_index: int = 0, num_shards: int = 1,
) -> Batch:
  """A whole split as read-only arrays `[num_examples, length]`, memoised."""
  _check_shard(shard_index, num_shards)
  return _encoded(
      task, split, _tasks().resolve_data_dir(task, data_dir),
      None if vocab_path is None else vocab_lib.resolve_vocab_path(vocab_path),
      input_length, target_length, limit, shard_index, num_shards)


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """The example order of one epoch; depends only on (seed, epoch)."""
  return np.random.default_rng((seed, epoch)).permutation(num_examples)


def batch_indices(step: int, *, batch_size: int, num_examples: int, seed: int,
                  shuffle: bool = True) -> np.ndarray:
  """The split indices of the examples in batch `step` of the stream."""
  positions = step * batch_size + np.arange(batch_size)
  epochs, offsets = np.divmod(positions, num_examples)
  if not shuffle:
    return offsets
  indices = np.empty(batch_size, dtype=np.int64)
  for epoch in np.unique(epochs):
    mask = epochs == epoch
    indices[mask] = epoch_permutation(seed, int(epoch),
                                      num_examples)[offsets[mask]]
  return indices


def batch_iterator(
    task: str, split: str, *, batch_size: int, input_length: int,
    target_length: int, seed: int, shuffle: bool = True, repeat: bool = True,
    data_dir: str | os.PathLike[str] | None = None,
    vocab_path: str | os.PathLike[str] | None = None, start_step: int = 0,
    limit: int | None = None, shard_index: int = 0, num_shards: int = 1,
) -> Iterator[Batch]:
  """Training batches, deterministic in (seed, step) and resumable.

  Args:
    task: a task name (see `tasks.TASK_NAMES`).
    split: "train", "validation" or "test".
    batch_size: examples per batch.
    input_length: length of "inputs".
    target_length: length of "targets" (or "chosen"/"rejected").
    seed: the shuffling seed.
    shuffle: shuffle each epoch; else keep the split's order.
    repeat: loop over epochs forever; else stop after the last full batch of
      the first epoch (the remainder is dropped; see `eval_batches`).
    data_dir: the task's data directory (None: its default).
    vocab_path: a sentencepiece model (None: the built-in one).
    start_step: the first step to yield; batches are those a fresh iterator
      yields at steps start_step, start_step + 1, ...
    limit: use only the first `limit` examples of the split.
    shard_index: this process's shard (every `num_shards`-th example).
    num_shards: number of shards.

  Yields:
    Batches keyed as in the module docstring, each array
    `[batch_size, length]` int32.
  """
  if batch_size < 1:
    raise UserError(f"batch_size must be >= 1, got {batch_size}")
  if start_step < 0:
    raise UserError(f"start_step must be >= 0, got {start_step}")
  arrays = encoded_split(task, split, input_length=input_length,
                         target_length=target_length, data_dir=data_dir,
                         vocab_path=vocab_path, limit=limit,
                         shard_index=shard_index, num_shards=num_shards)
  num_examples = len(next(iter(arrays.values())))
  steps = itertools.count(start_step) if repeat else range(
      start_step, num_examples // batch_size)
  for step in steps:
    idx = batch_indices(step, batch_size=batch_size,
                        num_examples=num_examples, seed=seed, shuffle=shuffle)
    yield {k: v[idx] for k, v in arrays.items()}


def eval_batches(
    task: str, split: str, *, batch_size: int, input_length: int,
    target_length: int, data_dir: str | os.PathLike[str] | None = None,
    vocab_path: str | os.PathLike[str] | None = None,
    limit: int | None = None, shard_index: int = 0, num_shards: int = 1,
) -> Iterator[Batch]:
  """The whole split once, in order, for evaluation.

  The last batch is filled up with all-pad rows; "weights" `[batch]` float32
  is 1 for real examples and 0 for filler, so weighted metrics cover every
  example exactly once.

  Args:
    task: a task name.
    split: "train", "validation" or "test".
    batch_size: examples per batch.
    input_length: length of "inputs".
    target_length: length of "targets" (or "chosen"/"rejected").
    data_dir: the task's data directory (None: its default).
    vocab_path: a sentencepiece model (None: the built-in one).
    limit: use only the first `limit` examples of the split.
    shard_index: this process's shard.
    num_shards: number of shards.

  Yields:
    Batches as `batch_iterator`'s plus "weights".
  """
  if batch_size < 1:
    raise UserError(f"batch_size must be >= 1, got {batch_size}")
  arrays = encoded_split(task, split, input_length=input_length,
                         target_length=target_length, data_dir=data_dir,
                         vocab_path=vocab_path, limit=limit,
                         shard_index=shard_index, num_shards=num_shards)
  num_examples = len(next(iter(arrays.values())))
  pad_id = vocab_lib.special_tokens_of(vocab_path).pad_id
  for start in range(0, num_examples, batch_size):
    size = min(batch_size, num_examples - start)
    batch = {}
    for key, array in arrays.items():
      part = np.full((batch_size, array.shape[1]), pad_id, dtype=np.int32)
      part[:size] = array[start:start + size]
      batch[key] = part
    weights = np.zeros((batch_size,), dtype=np.float32)
    weights[:size] = 1.0
    batch["weights"] = weights
    yield batch


def num_examples(task: str, split: str, *,
                 data_dir: str | os.PathLike[str] | None = None,
                 limit: int | None = None, shard_index: int = 0,
                 num_shards: int = 1) -> int:
  """The number of examples `eval_batches` covers."""
  return len(text_examples(task, split, data_dir=data_dir, limit=limit,
                           shard_index=shard_index, num_shards=num_shards))
