"""The length reward of the DeRa paper's toy summarisation study (eq. 10).

  r(x, y) = 0 if L_min <= |y| <= L_max, else -1.

|y| is counted in tokens of the vocabulary (EOS not counted) or in
whitespace-separated words of the decoded text.

In tokens, the sampled ids are the source of truth: `score_tokens`
(training, decoding) and `score_ids` (decode rows, studies) count them;
`score` re-encodes a text, which can give other ids than were sampled (a
response sampled as "▁t" "h" "e" re-encodes as the one piece "▁the"), so it
is for texts whose ids are unknown.
"""

import dataclasses
from typing import Optional, Sequence

import jax.numpy as jnp
import numpy as np

from realign_jax.plumbing import config_check
from realign_jax.data import vocab as vocab_lib
from realign_jax.plumbing.errors import UserError
from realign_jax.rewards import base

UNITS = ("tokens", "words")


def length_reward(length, min_length: int, max_length: int):
  """Eq. 10 on lengths (numpy or jax arrays): 0 inside [min, max], -1 outside."""
  inside = (length >= min_length) & (length <= max_length)
  if isinstance(length, np.ndarray):
    return np.where(inside, 0.0, -1.0).astype(np.float32)
  return jnp.where(inside, 0.0, -1.0).astype(jnp.float32)


@dataclasses.dataclass
class LengthReward(base.Reward):
  """0 when the response length is in [min_length, max_length], -1 otherwise."""

  min_length: int = 40
  max_length: int = 50
  unit: str = "tokens"
  vocab_path: Optional[str] = None
  name: str = "length"

  def __post_init__(self):
    config_check.check_config(self)  # NOTE: before the comparisons below
    if self.unit not in UNITS:
      raise UserError(f"LengthReward.unit must be one of {UNITS}, got {self.unit!r}")
    if self.min_length < 0 or self.max_length < self.min_length:
      raise UserError(f"LengthReward needs 0 <= min_length <= max_length, got "
                      f"[{self.min_length}, {self.max_length}]")
    self._vocab = None

  def length_of(self, response: str) -> int:
    if self.unit == "words":
      return len(response.split())
    if self._vocab is None:
      self._vocab = vocab_lib.load_vocabulary(self.vocab_path)
    return len(vocab_lib.encode(self._vocab, response))

  def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    del prompts
    lengths = np.asarray([self.length_of(r) for r in responses], np.int64)
    return length_reward(lengths, self.min_length, self.max_length)

  def score_ids(self, prompts, responses, response_ids) -> np.ndarray:
    if self.unit == "words":
      return self.score(prompts, responses)
    t = self.special_tokens()
    lengths = np.asarray([len(base.strip_ids(ids, eos_id=t.eos_id, pad_id=t.pad_id))
                          for ids in response_ids], np.int64)
    return length_reward(lengths, self.min_length, self.max_length)

  def score_tokens(self, params, inputs, responses, lengths):
    if self.unit == "words":
      return base.host_score_tokens(self, inputs, responses, lengths)
    del params, inputs
    n = base.response_token_count(responses, lengths, self.special_tokens().eos_id)
    return length_reward(n, self.min_length, self.max_length)
