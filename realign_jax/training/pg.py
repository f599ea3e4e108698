"""Vanilla policy gradient (REINFORCE) on the KL-regularised return (eq. 13 of the DeRa paper).

  grad = E_{x, y ~ pi} [ grad log pi(y|x) (R(x, y) - beta KL - b) ],

with the sequence KL estimated on the sample, log pi(y|x) - log pi_ref(y|x)
(its own gradient term, E[grad log pi], vanishes), and b a running baseline:
an exponential moving average of past batches' mean return, kept in `aux`
(checkpointed). The baseline uses only earlier batches, so the estimator
stays unbiased.
"""

import dataclasses

import jax.numpy as jnp

from realign_jax.plumbing.errors import UserError
from realign_jax.training import policy as policy_lib
from realign_jax.training import rl


def reinforce_loss(seq_logp, advantages):
  """-mean_b A_b log pi(y_b | x_b): [B], [B] -> scalar (A is a constant)."""
  return -jnp.mean(advantages * seq_logp)


@dataclasses.dataclass
class PG(rl.RLAlgorithm):
  """REINFORCE with a running-mean baseline and a frozen reference."""

  baseline_decay: float = 0.9  # 0: the previous batch's mean return
  normalise_by_length: bool = False  # divide log pi(y|x) by the response length
  output_head: str = "lm"
  name = "pg"

  def __post_init__(self):
    super().__post_init__()
    if not 0.0 <= self.baseline_decay < 1.0:
      raise UserError(f"PG.baseline_decay must be in [0, 1), got {self.baseline_decay}")

  def init_aux(self, params):
    aux = super().init_aux(params)
    aux.update(baseline=jnp.zeros((), jnp.float32), baseline_count=jnp.zeros((), jnp.int32))
    return aux

  def prepare(self, params, batch, rng, aux=None, frozen=None):
    beta = aux["beta"]
    inputs = batch["inputs"]
    roll = self.rollout(params, frozen, inputs, rng)
    kl_sampled = jnp.sum(roll["logp"] - roll["ref_logp"], axis=-1)  # [B]
    returns = roll["scores"] - beta * kl_sampled
    # NOTE: no baseline before the first batch (count 0); afterwards the EMA.
    baseline = jnp.where(aux["baseline_count"] > 0, aux["baseline"], 0.0)
    metrics = self.rollout_metrics(roll, beta)
    metrics.update({"objective/return": jnp.mean(returns), "baseline": baseline})
    prepared = {"inputs": inputs, "tokens": roll["tokens"], "mask": roll["mask"],
                "advantages": returns - baseline}
    return prepared, metrics

  def loss(self, params, batch, rng, aux=None, frozen=None):
    del rng, aux, frozen
    mask = batch["mask"]
    out = self.anchored.policy_outputs(params, batch["inputs"], batch["tokens"])
    seq_logp = jnp.sum(policy_lib.logprobs_from_logits(out["logits"], batch["tokens"],
                                                       self.anchored.pad_id) * mask, axis=-1)
    if self.normalise_by_length:
      seq_logp = seq_logp / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
    loss = reinforce_loss(seq_logp, batch["advantages"])
    return loss, {"loss/policy": loss, "policy/seq_logp": jnp.mean(seq_logp)}

  def update_aux(self, aux, params, metrics, step):
    aux = super().update_aux(aux, params, metrics, step)
    ret = metrics["objective/return"]
    first = aux["baseline_count"] == 0
    baseline = jnp.where(first, ret,
                         self.baseline_decay * aux["baseline"] + (1 - self.baseline_decay) * ret)
    return dict(aux, baseline=baseline, baseline_count=aux["baseline_count"] + 1)
