"""Tests of the built-in corpus, the vocabulary and the batch pipeline."""

import re
import shutil

import numpy as np
import pytest
import seqio

from realign_jax.data import corpus
from realign_jax.data import pipeline
from realign_jax.data import tasks
from realign_jax.data import vocab as vocab_lib
from realign_jax.plumbing.errors import UserError

TASK = "builtin_summarize"


@pytest.fixture(scope="module")
def vocab():
  return vocab_lib.load_vocabulary()


def _batches(n, **kwargs):
  it = pipeline.batch_iterator(TASK, "train", **kwargs)
  return [next(it) for _ in range(n)]


def test_corpus_splits_nonempty_and_disjoint():
  splits = {s: corpus.read_corpus(s) for s in corpus.SPLITS}
  assert len(splits["train"]) > 5000
  assert all(len(rows) > 100 for rows in splits.values())
  for field in ("id", "document", "summary"):
    seen = [set(r[field] for r in splits[s]) for s in corpus.SPLITS]
    assert sum(map(len, seen)) == len(set.union(*seen)), field
  for row in splits["validation"][:200]:
    assert 3 <= len(row["summary"].split()) <= 40
    assert 15 <= len(row["document"].split()) <= 200
    assert ">>>" not in row["document"]


def test_sources_md_counts_match_files():
  text = (vocab_lib.BUILTIN_DIR / "SOURCES.md").read_text()
  total = re.search(r"\| \*\*total\*\* \|[ |]*?(\d+) \| (\d+) \| (\d+) \|",
                    text)
  counts = tuple(len(corpus.read_corpus(s)) for s in corpus.SPLITS)
  assert tuple(map(int, total.groups())) == counts


def test_vocab_special_ids(vocab):
  sp = vocab.tokenizer
  assert vocab.vocab_size == 2048
  assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
  assert vocab_lib.PAD_ID == 0 and vocab_lib.EOS_ID == 1


def test_round_trip_summary(vocab):
  summary = corpus.read_corpus("validation")[0]["summary"]
  ids = vocab_lib.encode(vocab, summary)
  assert ids and vocab_lib.EOS_ID not in ids and vocab_lib.PAD_ID not in ids
  assert vocab_lib.decode(vocab, ids) == summary
  # Stops at EOS, ignores padding, accepts numpy rows.
  row = np.array(ids + [1, 7, 8, 0, 0])
  assert vocab_lib.decode(vocab, row) == summary
  assert vocab_lib.decode(vocab, [0] + ids[:2] + [0]) == vocab_lib.decode(
      vocab, ids[:2])
  # Byte fallback: characters unseen in the corpus still round-trip.
  text = "naïve ☃ 漢字"
  assert vocab_lib.decode(vocab, vocab_lib.encode(vocab, text)) == text


def test_load_vocabulary_by_path_and_errors(tmp_path):
  copy = tmp_path / "copy.model"
  shutil.copy(vocab_lib.BUILTIN_VOCAB_PATH, copy)
  assert vocab_lib.load_vocabulary(str(copy)).vocab_size == 2048
  bad = tmp_path / "bad.model"
  bad.write_bytes(b"not a model")
  for path in (tmp_path / "missing.model", bad, tmp_path):
    with pytest.raises(UserError, match=re.escape(str(path))):
      vocab_lib.load_vocabulary(str(path))


def test_encode_pair_truncates_and_terminates(vocab):
  long_text = "one two three four five six seven eight nine ten eleven"
  out = pipeline.encode_pair(vocab, long_text, "a b", 6, 8)
  assert out["inputs"].dtype == np.int32 and out["inputs"].shape == (6,)
  assert list(out["inputs"][:5]) == vocab_lib.encode(vocab, long_text)[:5]
  assert out["inputs"][5] == vocab_lib.EOS_ID
  n = len(vocab_lib.encode(vocab, "a b"))
  assert out["targets"][n] == vocab_lib.EOS_ID
  assert not out["targets"][n + 1:].any()


def _check_eos_layout(array):
  for row in array:
    nonpad = int((row != 0).sum())
    assert row[nonpad - 1] == vocab_lib.EOS_ID  # EOS is the last real token,
    assert (row[:nonpad - 1] != vocab_lib.EOS_ID).all()  # the only one,
    assert not row[nonpad:].any()  # and only padding follows.


def test_batch_iterator_shapes_eos_and_determinism():
  kwargs = dict(batch_size=8, input_length=64, target_length=16, seed=3)
  batches = _batches(3, **kwargs)
  for batch in batches:
    assert set(batch) == {"inputs", "targets"}
    assert batch["inputs"].shape == (8, 64)
    assert batch["targets"].shape == (8, 16)
    assert batch["inputs"].dtype == batch["targets"].dtype == np.int32
    _check_eos_layout(batch["inputs"])
    _check_eos_layout(batch["targets"])
  again = _batches(3, **kwargs)
  other = _batches(3, **{**kwargs, "seed": 4})
  for a, b in zip(batches, again):
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
  assert not np.array_equal(batches[0]["targets"], other[0]["targets"])


def test_batch_iterator_resume_across_epochs():
  # 10 examples, batches of 4: batches straddle epoch boundaries.
  kwargs = dict(batch_size=4, input_length=16, target_length=8, seed=0,
                limit=10)
  fresh = _batches(12, **kwargs)
  for k in (1, 2, 7):
    resumed = _batches(12 - k, start_step=k, **kwargs)
    for a, b in zip(fresh[k:], resumed):
      np.testing.assert_array_equal(a["inputs"], b["inputs"])
      np.testing.assert_array_equal(a["targets"], b["targets"])


def test_batch_iterator_epochs_are_permutations():
  arrays = pipeline.encoded_split(TASK, "train", input_length=16,
                                  target_length=8, limit=12)
  batches = _batches(6, batch_size=4, input_length=16, target_length=8,
                     seed=1, limit=12)
  for epoch in (batches[:3], batches[3:]):
    rows = np.concatenate([b["targets"] for b in epoch])
    assert sorted(map(tuple, rows)) == sorted(map(tuple, arrays["targets"]))
  first = np.concatenate([b["targets"] for b in batches[:3]])
  assert not np.array_equal(first, arrays["targets"])  # It did shuffle.
  ordered = list(pipeline.batch_iterator(
      TASK, "train", batch_size=5, input_length=16, target_length=8, seed=1,
      limit=12, shuffle=False, repeat=False))
  assert len(ordered) == 2
  np.testing.assert_array_equal(ordered[1]["targets"], arrays["targets"][5:10])


def test_eval_batches_cover_split_once():
  arrays = pipeline.encoded_split(TASK, "validation", input_length=32,
                                  target_length=8)
  batches = list(pipeline.eval_batches(TASK, "validation", batch_size=64,
                                       input_length=32, target_length=8))
  n = len(arrays["inputs"])
  assert len(batches) == -(-n // 64)
  weights = np.concatenate([b["weights"] for b in batches])
  assert weights.dtype == np.float32 and weights.sum() == n
  inputs = np.concatenate([b["inputs"] for b in batches])
  np.testing.assert_array_equal(inputs[:n], arrays["inputs"])
  assert not inputs[n:].any() and not weights[n:].any()
  assert n == pipeline.num_examples(TASK, "validation")


def test_text_examples_order_limit_and_shards():
  rows = pipeline.text_examples(TASK, "test")
  raw = corpus.read_corpus("test")
  assert rows[0] == {"inputs": raw[0]["document"],
                     "targets": raw[0]["summary"]}
  assert pipeline.text_examples(TASK, "test", limit=5) == rows[:5]
  shards = [pipeline.text_examples(TASK, "test", shard_index=i, num_shards=3)
            for i in range(3)]
  assert sum(map(len, shards)) == len(rows)
  assert shards[1][0] == rows[1] and shards[2][1] == rows[5]
  with pytest.raises(UserError, match="shard"):
    pipeline.text_examples(TASK, "test", shard_index=3, num_shards=3)


def test_get_task_idempotent_and_seqio_dataset():
  task = tasks.get_task(TASK)
  assert tasks.get_task(TASK) is task
  assert seqio.get_mixture_or_task(TASK) is task
  assert tasks.register_tasks()[0] == TASK
  ds = task.get_dataset(sequence_length={"inputs": 32, "targets": 8},
                        split="validation", shuffle=False)
  example = next(ds.as_numpy_iterator())
  assert example["targets"][-1] == vocab_lib.EOS_ID
  assert len(example["inputs"]) <= 32


def test_unknown_task_and_split():
  with pytest.raises(UserError, match="known tasks: builtin_summarize, xsum"):
    tasks.get_task("nope")
  with pytest.raises(UserError, match="unknown split 'dev'"):
    pipeline.text_examples(TASK, "dev")
