"""Controlled decoding with a value model: token-wise (TokenwiseCD) and blockwise (BlockwiseCD).

  decode.method = @TokenwiseCD()
  TokenwiseCD.value_checkpoint = 'runs/fudge'
  TokenwiseCD.beta = 1.0

The value model is a run directory of configs/value/: output_head 'scalar'
scores the top-k candidates, 'lm' is a Q-head over the vocabulary.
"""

import dataclasses
from typing import Optional

import numpy as np

from realign_jax.checkpoints import run_dir
from realign_jax.decoding import controlled, dera, sampler
from realign_jax.plumbing.errors import UserError
from realign_jax.evaluation import best_of_n_theory
from realign_jax.inference.method import Context, SingleRunner, check_same_tokens, temperature
from realign_jax.models.api import LanguageModel


def _value_kind(method: SingleRunner, value_checkpoint: Optional[str], ctx: Context):
  if not value_checkpoint:
    raise UserError(f"method {method.name!r} needs {type(method).__name__}.value_checkpoint (a "
                    f"value-model run directory, see configs/value/)")
  vcfg, vhead = run_dir.read_model_json(value_checkpoint)
  value = dera.Component(LanguageModel(vcfg, vhead), None)
  kind = controlled.head_kind(value)
  controlled.check_same_vocab(dera.Component(LanguageModel(ctx.ref_cfg), None), value,
                              f"value model {value_checkpoint}")
  check_same_tokens(ctx.ref_cfg, ctx.ref_checkpoint, vcfg, value_checkpoint)
  return kind


@dataclasses.dataclass
class TokenwiseCD(SingleRunner):
  """Token-wise CD: pi(z | s) ~ p(z | s) exp(V([s, z]) / beta) over the top-k of p.

  `top_k` 0 scores the whole vocabulary (a Q-head value model, output_head 'lm').
  """
  value_checkpoint: Optional[str] = None
  beta: float = 1.0
  top_k: int = 10

  name = "cd_token"

  def components(self):
    return {"value": (self.value_checkpoint, "value")}

  def setting(self, ctx):
    kind = _value_kind(self, self.value_checkpoint, ctx)
    controlled.check_positive("TokenwiseCD.beta", self.beta)
    if self.top_k == 0 and kind != "q":
      # NOTE: a scalar head scores candidates on its cache forked once per
      # candidate: the whole vocabulary would fork it V ways every step.
      raise UserError(f"TokenwiseCD.top_k = 0 (the whole vocabulary) needs a Q-head value "
                      f"model (output_head 'lm'); {self.value_checkpoint} has a scalar head: "
                      f"set TokenwiseCD.top_k to the number of candidates")
    if self.top_k != 0:
      controlled.check_top_k(self.top_k, ctx.ref_cfg.vocab_size,
                             "TokenwiseCD.top_k (candidates per step)")
    return {"beta": float(self.beta), "top_k": self.top_k,
            "value_head": "q" if kind == "q" else "scalar",
            "temperature": temperature(ctx.sampling)}

  def decode_fn(self, comps, rewards, inputs, rng, cfg, n, row_ids_):
    return controlled.tokenwise_cd(comps["ref"], comps["value"], inputs, rng, cfg,
                                   beta=self.beta, top_k=self.top_k, num_samples=n,
                                   row_ids=row_ids_), None


@dataclasses.dataclass
class BlockwiseCD(SingleRunner):
  """Blockwise CD: `num_candidates` (K) blocks of `block_length` (M) tokens, the best by V kept."""
  value_checkpoint: Optional[str] = None
  num_candidates: int = 4
  block_length: int = 4

  name = "cd_block"

  def components(self):
    return {"value": (self.value_checkpoint, "value")}

  def setting(self, ctx):
    kind = _value_kind(self, self.value_checkpoint, ctx)
    controlled.check_at_least_one("BlockwiseCD.num_candidates (K, blocks per step)",
                                  self.num_candidates)
    controlled.check_at_least_one("BlockwiseCD.block_length (M, tokens per block)",
                                  self.block_length)
    return {"num_candidates": self.num_candidates, "block_length": self.block_length,
            "value_head": "q" if kind == "q" else "scalar",
            "temperature": float(ctx.sampling.temperature)}

  def decode_fn(self, comps, rewards, inputs, rng, cfg, n, row_ids_):
    return controlled.blockwise_cd(comps["ref"], comps["value"], inputs, rng, cfg,
                                   num_blocks=self.num_candidates, block_len=self.block_length,
                                   num_samples=n, row_ids=row_ids_), None

  def describe_batch(self, batch):
    # every row of the batch proposes blocks until the longest row is done
    lengths = np.asarray(batch.outs[0]["lengths"])
    return {"block_rounds": int(np.max(controlled.num_blocks_used(lengths, self.block_length)))}

  def kl_fields(self, batch, out, r, length, ref_lp, sampling):
    rounds = self.describe_batch(batch)["block_rounds"]
    blocks = int(controlled.num_blocks_used(length, self.block_length))
    prop_lp = np.asarray(out["proposal_logprobs"][r, :length])
    k = self.num_candidates
    # NOTE: blockwise CD has no per-token distribution; each block is a
    # best-of-K draw from the proposal p~(. | s), so by the chain rule over
    # blocks the mean of blocks x (log K - (K - 1) / K) bounds KL(cd || p~),
    # and the sum over blocks of the best-of-K estimator
    # KL_hat(p~(block | s), K) estimates it. p~ is p itself only at
    # temperature 1 without top-k / top-p (`kl_to` says which);
    # ref_logprobs are always under p, proposal_logprobs under p~.
    return dict(ref_logprobs=ref_lp.tolist(), proposal_logprobs=prop_lp.tolist(),
                blocks=blocks, block_latency_s=batch.seconds / max(rounds, 1), kl_kind="bound",
                kl_to=block_kl_to(sampling), kl_bound=blocks * best_of_n_theory.kl_bound(k),
                kl_estimate=block_kl_estimate(prop_lp, self.block_length, k))

  def summary(self, rows):
    return {"method": self.name, "setting": self._setting,
            "mean_kl_bound": float(np.mean([r["kl_bound"] for r in rows])),
            "mean_kl_estimate": float(np.mean([r["kl_estimate"] for r in rows])),
            "kl_kind": "bound", "kl_to": rows[0]["kl_to"]}


def block_kl_to(cfg: sampler.SamplingConfig) -> str:
  """What blockwise CD's KL bound and estimate are relative to: 'p' or 'proposal'."""
  is_p = (not cfg.greedy and cfg.temperature == 1.0 and not cfg.top_k and cfg.top_p >= 1.0)
  return "p" if is_p else "proposal"


def block_kl_estimate(proposal_logprobs, block_length: int, num_candidates: int) -> float:
  """Sum over the blocks of a response of KL_hat(eps, K), eps = p~(block | prefix).

  `proposal_logprobs` are the tokens' log-probs under the distribution the
  blocks were drawn from (the proposal p~; p itself at temperature 1 without
  truncation). The best-of-n estimator per block (`best_of_n_theory.kl_estimator`);
  a block cut by EOS counts with the tokens it has.
  """
  lp = np.asarray(proposal_logprobs, np.float64)
  if lp.size == 0:
    return 0.0
  sums = np.add.reduceat(lp, np.arange(0, lp.size, block_length))
  eps = np.clip(np.exp(sums), np.finfo(np.float64).tiny, 1.0)
  return float(np.sum(best_of_n_theory.kl_estimator(eps, num_candidates)))
