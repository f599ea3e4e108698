"""Rewards: the length reward (eq. 10 of the DeRa paper) by hand, the host-callback path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from realign_jax.data import vocab as vocab_lib
from realign_jax.plumbing.errors import UserError
from realign_jax.rewards import base
from realign_jax.rewards.length import LengthReward, length_reward


def test_length_reward_by_hand():
  # [L_min, L_max] = [2, 4]: 0 inside (ends included), -1 outside.
  lengths = np.array([0, 1, 2, 3, 4, 5, 9])
  np.testing.assert_array_equal(length_reward(lengths, 2, 4), [-1, -1, 0, 0, 0, -1, -1])
  np.testing.assert_array_equal(np.asarray(length_reward(jnp.asarray(lengths), 2, 4)),
                                [-1, -1, 0, 0, 0, -1, -1])


def test_length_in_tokens_on_token_arrays():
  # Rows: 3 tokens + EOS; 2 tokens + EOS; 5 tokens cut at the limit (no EOS).
  responses = jnp.array([[7, 8, 9, 1, 0], [7, 8, 1, 0, 0], [5, 5, 5, 5, 5]], jnp.int32)
  lengths = jnp.array([4, 3, 5], jnp.int32)
  np.testing.assert_array_equal(np.asarray(base.response_token_count(responses, lengths)),
                                [3, 2, 5])
  r = LengthReward(min_length=3, max_length=4, unit="tokens")
  scores = jax.jit(lambda x, y, n: r.score_tokens(None, x, y, n))(
      jnp.ones((3, 2), jnp.int32), responses, lengths)
  np.testing.assert_array_equal(np.asarray(scores), [0.0, -1.0, -1.0])


def test_length_in_words_on_text():
  r = LengthReward(min_length=2, max_length=3, unit="words")
  scores = base.score_texts(r, ["p"] * 4, ["one", "one two", "one  two three", "a b c d"])
  np.testing.assert_array_equal(scores, [-1, 0, 0, -1])
  assert scores.dtype == np.float32


def test_words_unit_inside_jit_goes_through_the_host():
  vocab = vocab_lib.load_vocabulary(None)
  texts = ["the cat", "the cat sat on the mat", "cat"]
  ids = [vocab_lib.encode(vocab, t) + [1] for t in texts]
  t = max(len(x) for x in ids) + 2
  responses = np.zeros((3, t), np.int32)
  for i, x in enumerate(ids):
    responses[i, :len(x)] = x
  lengths = np.array([len(x) for x in ids], np.int32)
  r = LengthReward(min_length=2, max_length=3, unit="words")
  scores = jax.jit(lambda x, y, n: r.score_tokens(None, x, y, n))(
      jnp.ones((3, 4), jnp.int32), jnp.asarray(responses), jnp.asarray(lengths))
  np.testing.assert_array_equal(np.asarray(scores), [0.0, -1.0, -1.0])
  assert base.decode_tokens(vocab, responses, lengths) == texts


def test_tokens_unit_on_text_counts_vocabulary_pieces():
  vocab = vocab_lib.load_vocabulary(None)
  text = "the cat sat on the mat"
  n = len(vocab_lib.encode(vocab, text))
  r = LengthReward(min_length=n, max_length=n, unit="tokens")
  np.testing.assert_array_equal(r.score(["x", "x"], [text, text + " again"]), [0, -1])


def test_strip_ids():
  assert base.strip_ids([5, 6, 1, 7, 0]) == [5, 6]
  assert base.strip_ids([5, 0, 6, 7], length=3) == [5, 6]


@pytest.mark.parametrize("kwargs,match", [
    (dict(min_length=5, max_length=4), "min_length <= max_length"),
    (dict(min_length=-1, max_length=4), "min_length <= max_length"),
    (dict(unit="chars"), "unit must be one of"),
])
def test_bad_length_reward_config(kwargs, match):
  with pytest.raises(UserError, match=match):
    LengthReward(**kwargs)


def test_bad_host_scores():
  class Short(base.Reward):
    name = "short"

    def score(self, prompts, responses):
      return [0.0]

  with pytest.raises(UserError, match="reward short returned 1 scores for 2 responses"):
    base.score_texts(Short(), ["a", "b"], ["c", "d"])
  with pytest.raises(UserError, match="2 prompts but 1 responses"):
    base.score_texts(Short(), ["a", "b"], ["c"])
