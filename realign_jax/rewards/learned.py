"""A trained Bradley-Terry reward model (`training/reward_model.py`) as a `Reward`.

Loaded from its run directory (model.json + latest checkpoint). Text is
scored exactly as in training: prompt and response each encoded, cut to
`input_length - 1` / `target_length - 1` tokens and EOS-terminated, the
scalar head read at the response's EOS. Token arrays from the sampler are
scored inside jit (`score_tokens`, traceable, params passed in as frozen
arguments); a response cut at the sampler's length limit gets an EOS
appended, so it is scored like the same text would be.
"""

import dataclasses
import functools
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from realign_jax.checkpoints import manager as ckpt_lib
from realign_jax.data import pipeline
from realign_jax.data import vocab as vocab_lib
from realign_jax.plumbing.errors import UserError
from realign_jax.models.api import LanguageModel
from realign_jax.models.heads import last_position_values
from realign_jax.parallel import partitioning
from realign_jax.rewards import base
from realign_jax.parallel.abstract import sharded_abstract


def sequence_rewards(lm: LanguageModel, params, inputs, responses, *, dropout_rng=None):
  """r(x, y) per row: the scalar head at the last real response position.

  Args:
    lm: a model with output_head "scalar" (or "lm+scalar").
    params: its params.
    inputs: [B, Li] prompts (right-padded, ending in EOS).
    responses: [B, Lt] responses (right-padded, ending in EOS).
    dropout_rng: dropout on iff given.

  Returns:
    [B] float32.
  """
  out = lm.forward(params, inputs, responses, dropout_rng=dropout_rng)
  return last_position_values(out["values"], responses != lm.config.tokens.pad_id)


def eos_terminated(responses, lengths, eos_id: int = base.EOS_ID,
                   pad_id: int = vocab_lib.PAD_ID):
  """Sampled responses as reward-model targets: [B, T], [B] -> [B, T + 1].

  Keeps the first `lengths[b]` tokens, appends EOS where none was generated
  (a response cut at the length limit), pads with pad (default T5's ids).
  """
  b, t = responses.shape
  pos = jnp.arange(t + 1)[None, :]
  padded = jnp.pad(responses, ((0, 0), (0, 1)), constant_values=pad_id)
  kept = jnp.where(pos < lengths[:, None], padded, pad_id)
  has_eos = jnp.any(kept == eos_id, axis=1)
  add = (pos == lengths[:, None]) & ~has_eos[:, None]
  return jnp.where(add, eos_id, kept).astype(jnp.int32)


def score_token_arrays(lm: LanguageModel, params, inputs, responses, lengths):
  """r(x, y) of sampled responses; traceable: [B, Li], [B, T], [B] -> [B] float32."""
  t = lm.config.tokens
  return sequence_rewards(lm, params, inputs, eos_terminated(responses, lengths, t.eos_id,
                                                             t.pad_id))


@dataclasses.dataclass
class LearnedReward(base.Reward):
  """Scores with the reward model saved in `model_dir`."""

  model_dir: str
  vocab_path: Optional[str] = None
  input_length: int = 96
  target_length: int = 24
  batch_size: int = 64
  name: str = "learned"

  def __post_init__(self):
    config, head = ckpt_lib.read_model_json(self.model_dir)
    if head != "scalar":
      raise UserError(f"{self.model_dir} holds a model with output_head {head!r}, not a reward "
                      "model ('scalar'; train one with configs/reward/)")
    self.lm = LanguageModel(config, head)
    self._params = None
    self._mesh = None

  def setup(self, mesh, rules) -> None:
    """Loads the latest params onto `mesh` (sharded by `rules`)."""
    self._mesh = mesh
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      self._params = ckpt_lib.load_params(self.model_dir, sharded_abstract(self.lm, mesh, rules))

  def special_tokens(self):
    return self.lm.config.tokens

  def params(self):
    if self._params is None:
      self.setup(partitioning.create_mesh(), partitioning.logical_axis_rules())
    return self._params

  def score_tokens(self, params, inputs, responses, lengths) -> jax.Array:
    return score_token_arrays(self.lm, params, inputs, responses, lengths)

  @functools.cached_property
  def _score_fn(self):
    return jax.jit(lambda params, inputs, targets: sequence_rewards(self.lm, params, inputs,
                                                                    targets))

  def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    if len(prompts) != len(responses):
      raise UserError(f"{len(prompts)} prompts but {len(responses)} responses")
    if not prompts:
      return np.zeros((0,), np.float32)
    vocab = vocab_lib.load_vocabulary(self.vocab_path)
    tokens = vocab_lib.check_model_tokens(vocab, self.lm.config,
                                          f"the reward model {self.model_dir}")
    params = self.params()
    inputs = pipeline.fit_prompts(vocab_lib.encode_many(vocab, list(prompts)), self.input_length,
                                  tokens)
    targets = pipeline.fit(vocab_lib.encode_many(vocab, list(responses)), self.target_length,
                           tokens)
    n, bs = len(prompts), self.batch_size
    out = []
    # NOTE: fixed-size batches (the last one padded) keep one compiled shape.
    for start in range(0, n, bs):
      size = min(bs, n - start)
      pad = lambda a: np.concatenate([a[start:start + size],
                                      np.repeat(a[start:start + 1], bs - size, axis=0)])
      with jax.set_mesh(self._mesh):
        r = self._score_fn(params, jnp.asarray(pad(inputs)), jnp.asarray(pad(targets)))
      out.append(np.asarray(jax.device_get(r))[:size])
    return np.concatenate(out).astype(np.float32)
