"""The one reward interface: `(prompts, responses) -> scores`.

A `Reward` scores text (`score`, host side, used by best-of-n, evaluation and
judges) and token arrays inside jit (`score_tokens`, used by RL rollouts).
`score_tokens` defaults to a host callback that decodes the tokens and calls
`score`, so any text reward works inside a jitted train step; rewards that are
functions of the tokens (length in tokens) or of frozen params (a learned
reward model) override it with a traceable implementation.

Token conventions: `inputs` [B, Li] prompt ids right-padded with pad;
`responses` [B, T] sampled ids, padded with pad after EOS; `lengths` [B] the
number of generated tokens, EOS included when it was generated. The ids are
the vocabulary's (`special_tokens()`: those of `vocab_path`, T5's pad 0 /
eos 1 for the built-in vocabulary).
"""

import abc
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from realign_jax.data import vocab as vocab_lib
from realign_jax.plumbing.errors import UserError
from realign_jax.models.config import SpecialTokens

EOS_ID = vocab_lib.EOS_ID  # NOTE: T5's; a reward reads its vocabulary's (`special_tokens`)


class Reward(abc.ABC):
  """A scalar reward r(x, y) of a prompt and a response."""

  name: str = "reward"
  vocab_path: Optional[str] = None

  def setup(self, mesh, rules) -> None:
    """Host-side preparation (load a reward model onto the mesh); default none."""
    del mesh, rules

  def params(self) -> Any:
    """Frozen params passed to `score_tokens` (placed on the mesh); default none."""
    return None

  def special_tokens(self) -> SpecialTokens:
    """The special ids of the responses it scores: those of its vocabulary."""
    return vocab_lib.special_tokens_of(self.vocab_path)

  @abc.abstractmethod
  def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    """[N] float32 scores of N (prompt, response) texts."""

  def score_tokens(self, params, inputs, responses, lengths) -> jax.Array:
    """[B] float32 scores of token arrays; traceable (call inside jit)."""
    del params
    return host_score_tokens(self, inputs, responses, lengths)

  def score_ids(self, prompts: Sequence[str], responses: Sequence[str],
                response_ids: Sequence[Sequence[int]]) -> np.ndarray:
    """[N] scores of responses whose sampled ids are known (host side).

    `response_ids` [N] lists of ids (EOS and what follows, and pads, are cut
    by `strip_ids`). NOTE: a reward that is a function of the ids (the length
    in tokens) overrides this to read them: re-encoding a decoded text can
    give other ids than were sampled, and training (`score_tokens`) counts
    the sampled ones. Default: the texts.
    """
    del response_ids
    return self.score(prompts, responses)


# ---- helpers ------------------------------------------------------------------
def response_token_count(responses, lengths, eos_id: int = EOS_ID):
  """Tokens of each response, EOS not counted: [B, T], [B] -> [B] int32."""
  t = responses.shape[1]
  live = jnp.arange(t)[None, :] < lengths[:, None]
  return jnp.sum(live & (responses != eos_id), axis=-1).astype(jnp.int32)


def strip_ids(ids, length: Optional[int] = None, eos_id: int = EOS_ID,
              pad_id: int = vocab_lib.PAD_ID) -> list:
  """The ids before the first EOS (and within `length`), pads dropped (default: T5's ids)."""
  ids = [int(i) for i in ids[:length]] if length is not None else [int(i) for i in ids]
  if eos_id in ids:
    ids = ids[:ids.index(eos_id)]
  return [i for i in ids if i != pad_id]


def decode_tokens(vocab, tokens, lengths=None) -> list:
  """[B, T] ids -> B strings (up to the first EOS)."""
  tokens = np.asarray(tokens)
  lengths = None if lengths is None else np.asarray(lengths)
  special = vocab_lib.special_tokens(vocab)
  return [vocab_lib.decode(vocab, strip_ids(row, None if lengths is None else int(lengths[i]),
                                            special.eos_id, special.pad_id))
          for i, row in enumerate(tokens)]


def check_scores(scores, n: int, where: str) -> np.ndarray:
  """Validates a host reward's output: shape [n], real numbers (NaN is reported later)."""
  try:
    scores = np.asarray(scores, np.float32).reshape(-1)
  except (TypeError, ValueError) as e:
    raise UserError(f"{where} returned non-numeric scores: {e}") from e
  if scores.shape != (n,):
    raise UserError(f"{where} returned {scores.shape[0]} scores for {n} responses")
  return scores


_VOCABS = {}


def _vocab(path):
  if path not in _VOCABS:
    _VOCABS[path] = vocab_lib.load_vocabulary(path)
  return _VOCABS[path]


def host_score_tokens(reward: Reward, inputs, responses, lengths) -> jax.Array:
  """Scores token arrays with `reward.score` on the host (a `jax.pure_callback`).

  NOTE: a non-finite score is passed through unchanged: the caller reports it
  with the step it happened at (RL algorithms count them in a metric).
  """
  b = responses.shape[0]

  def cb(inp, resp, lens):
    vocab = _vocab(reward.vocab_path)
    prompts = decode_tokens(vocab, inp)
    texts = decode_tokens(vocab, resp, lens)
    return check_scores(reward.score(prompts, texts), b, f"reward {reward.name}")

  return jax.pure_callback(cb, jax.ShapeDtypeStruct((b,), jnp.float32), inputs, responses,
                           lengths, vmap_method="sequential")


def score_rows(reward: Reward, prompts: Sequence[str], responses: Sequence[str],
               response_ids: Sequence[Sequence[int]]) -> np.ndarray:
  """`reward.score_ids` (the sampled ids as the source of truth) validated ([N] float32)."""
  if not len(prompts) == len(responses) == len(response_ids):
    raise UserError(f"{len(prompts)} prompts but {len(responses)} responses and "
                    f"{len(response_ids)} id lists")
  return check_scores(reward.score_ids(list(prompts), list(responses), list(response_ids)),
                      len(prompts), f"reward {reward.name}")


def score_texts(reward: Reward, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
  """`reward.score` with its output validated ([N] float32)."""
  if len(prompts) != len(responses):
    raise UserError(f"{len(prompts)} prompts but {len(responses)} responses")
  return check_scores(reward.score(list(prompts), list(responses)), len(prompts),
                      f"reward {reward.name}")
