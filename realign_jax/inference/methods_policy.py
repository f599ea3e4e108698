"""A policy's own samples, its params in hand: what the studies and the pair builder decode.

`PolicySampling` goes through THE sampler and THE batch loop like every
method; it differs from the run-directory methods in taking loaded params
(one compiled program serves every checkpoint of one architecture: params
are arguments) and in its rows, those of the studies:

- the policy alone (`reference` None): `sampler.generate`, rows
  {prompt_index, sample, lam, tokens, length, response};
- a policy against its reference: the mixture (1, 0) over (pi, pi_ref)
  (bit-identical to pi's logits), so every row also carries the exact
  sequence KL to the reference (the sum over steps of the full-vocabulary
  KL) and the sequence log-ratio;
- with `lambdas`: DeRa between `reference` and `params` (the aligned
  model) at every lambda, in one batched call (`dera.dera_sweep`);
- with `reward`: each row's reward, scored on the sampled tokens exactly as
  in training, on the devices that decoded the batch.

Row seeds are shared: prompt b, sample j draws with seed `b * n + j`, so DeRa
at lambda = 1 reproduces the aligned model's samples token for token and
DeRa at lambda = 0 the reference's (a check the studies report). Every
`length` is the response length in tokens WITHOUT EOS, as the length reward
counts it.
"""

import dataclasses
import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from realign_jax.data import vocab as vocab_lib
from realign_jax.decoding import dera, sampler
from realign_jax.plumbing.errors import UserError
from realign_jax.inference.method import DecodeMethod, Runner, row_ids
from realign_jax.models.api import LanguageModel
from realign_jax.rewards import base as rewards_base


@functools.lru_cache(maxsize=8)
def generate_fn(lm: LanguageModel, config: sampler.SamplingConfig, num_samples: int):
  """jit fn(params, inputs [B, Li], seeds [B], rng) -> {tokens, lengths}; rows b * n + j."""
  def run(params, inputs, seeds, rng):
    out = sampler.generate(lm, params, inputs, rng, config, num_samples=num_samples,
                           row_ids=row_ids(seeds, num_samples))
    return {"tokens": out.tokens, "lengths": out.lengths}  # NOTE: only what the rows need
  return jax.jit(run)


@functools.lru_cache(maxsize=8)
def policy_fn(lm: LanguageModel, config: sampler.SamplingConfig, num_samples: int):
  """jit fn(policy_params, ref_params, inputs [B, Li], seeds [B], rng) -> SampleOutput.

  Rows are (prompt b, sample j) -> b * n + j; `kl` is to the reference.
  """
  def run(pol, ref, inputs, seeds, rng):
    comps = [dera.Component(lm, pol), dera.Component(lm, ref)]
    return dera.sample_mixture(comps, jnp.array([1.0, 0.0]), inputs, rng, config,
                               num_samples=num_samples, row_ids=row_ids(seeds, num_samples),
                               reference_index=1)
  return jax.jit(run)


@functools.lru_cache(maxsize=8)
def sweep_fn(lm: LanguageModel, config: sampler.SamplingConfig, num_samples: int):
  """jit fn(ref_params, aligned_params, lambdas [K], inputs, seeds, rng) -> SampleOutput.

  Rows are (prompt b, sample j, lambda k) -> (b * n + j) * K + k; `kl` is to the reference.
  """
  def run(ref, aligned, lambdas, inputs, seeds, rng):
    return dera.dera_sweep(dera.Component(lm, ref), dera.Component(lm, aligned), inputs, lambdas,
                           rng, config, seeds=seeds, num_samples=num_samples)
  return jax.jit(run)


@dataclasses.dataclass
class PolicySampling(DecodeMethod):
  """Samples of `lm` with `params`; see the module docstring for what each field adds.

  Attributes:
    lm: the policy's LanguageModel (the reference's too: one architecture).
    params: the policy's params (with `lambdas`: the aligned model's).
    reference: the reference's params, or None (no KL).
    reward: a `rewards.base.Reward` (its `params()` and `score_tokens`), or None.
    lambdas: DeRa's lambdas (needs `reference`), or None.
  """
  lm: LanguageModel
  params: Any
  reference: Any = None
  reward: Any = None
  lambdas: Optional[Sequence[float]] = None

  name = "policy"

  def runners(self, comps, rewards, sampling, num_samples):
    del comps, rewards
    self._reward_params = None if self.reward is None else self.reward.params()
    if self.lambdas is not None:
      if self.reference is None:
        raise UserError("PolicySampling.lambdas (a DeRa sweep) needs the reference's params")
      lams = jnp.asarray(self.lambdas, jnp.float32)
      return [Runner(sweep_fn(self.lm, sampling, num_samples), (self.reference, self.params,
                                                                 lams))]
    if self.reference is None:
      return [Runner(generate_fn(self.lm, sampling, num_samples), (self.params,))]
    return [Runner(policy_fn(self.lm, sampling, num_samples), (self.params, self.reference))]

  def device_outputs(self, outs, inputs):
    """The decoded batch and, given a reward, its [B * n * K] scores."""
    if self.reward is None:
      return outs
    out = outs[0]
    tokens, lengths = ((out["tokens"], out["lengths"]) if isinstance(out, dict)
                       else (out.tokens, out.lengths))
    rep = jnp.repeat(inputs, tokens.shape[0] // inputs.shape[0], axis=0)
    return [out, self.reward.score_tokens(self._reward_params, rep, tokens, lengths)]

  def rows(self, batch, prompts, vocab, n, seed, sampling):
    del prompts, seed, sampling
    out = batch.outs[0]
    if isinstance(out, dict):
      tokens, lengths, kl = out["tokens"], out["lengths"], None
    else:
      tokens, lengths, kl = out.tokens, out.lengths, out.kl
    scores = batch.outs[1] if self.reward is not None else None
    counts = np.asarray(rewards_base.response_token_count(tokens, lengths))
    lambdas = [None] if self.lambdas is None else self.lambdas
    k = len(lambdas)
    ref_lp = None if kl is None else out.model_logprobs[1 if self.lambdas is None else 0]
    rows = []
    for bi, p in enumerate(batch.idx):
      for j in range(n):
        for ki in range(k):
          r = (bi * n + j) * k + ki
          length = int(lengths[r])
          toks = tokens[r, :length]
          row = {"prompt_index": int(p), "sample": j,
                 "lam": None if lambdas[ki] is None else float(lambdas[ki]),
                 "tokens": toks.tolist(), "length": int(counts[r])}
          if scores is not None:
            row["reward"] = float(scores[r])
          if kl is not None:
            row["kl"] = float(np.sum(kl[r, :length]))
            row["log_ratio"] = float(np.sum(out.logprobs[r, :length] - ref_lp[r, :length]))
          row["response"] = vocab_lib.decode(vocab, toks)
          rows.append(row)
    return rows

  def summary(self, rows):
    return {"rows": len(rows)}
