"""PPO (Schulman et al. 2017) for the KL-regularised objective (eq. 1 of the DeRa paper).

Per step (through the one trainer loop):
  prepare: sample one response per prompt at temperature 1 (no top-k/top-p),
    score it, and build per-token rewards  -beta (log pi - log pi_ref)  with
    the task reward added at the last token; GAE(gamma, lambda) on the value
    head's estimates gives advantages (whitened) and returns.
  loss (num_epochs x num_minibatches updates): the clipped surrogate
    E[max(-A r, -A clip(r, 1 - eps, 1 + eps))], r = pi / pi_old, plus
    vf_coef times the clipped value loss
    0.5 E[max((V - R)^2, (V_old + clip(V - V_old, -eps_v, eps_v) - R)^2)].

The KL penalty (`kl_estimator`):
  "sampled": the per-token reward -beta (log pi(y_t) - log pi_ref(y_t)) of the
    sampled token (an unbiased estimate, one token of a whole vocabulary);
  "exact": the full-vocabulary KL_t = KL(pi(.|s_t) || pi_ref(.|s_t)) at every
    visited position, its gradient taken analytically in the loss (beta
    masked_mean KL_t, scaled like the whitened surrogate) and KL_{t+1} charged
    as a reward to action t (`rl.future_kl_rewards`). Both are unbiased for
    the gradient of beta KL(pi || pi_ref) over sequences; the exact one has far
    less variance.

The value head shares the policy's trunk (output_head "lm+scalar"); when
starting from an SFT checkpoint it starts fresh (zeros). Dropout is off for
rollouts, old log-probs and the loss alike, so on the first minibatch the new
log-probs equal the old ones and the ratio is exactly 1.
"""

import dataclasses

import jax
import jax.numpy as jnp

from realign_jax.plumbing.errors import UserError
from realign_jax.training import policy as policy_lib
from realign_jax.training import rl


def ppo_losses(logp, old_logp, advantages, values, old_values, returns, mask, *,
               clip_eps: float, value_clip: float) -> tuple:
  """The clipped surrogate and the clipped value loss, with diagnostics.

  All inputs [B, T]; means are over the masked tokens.

  Returns:
    (policy loss, value loss, metrics dict).
  """
  log_ratio = (logp - old_logp) * mask
  ratio = jnp.exp(log_ratio)
  pg1 = -advantages * ratio
  pg2 = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
  pg_loss = rl.masked_mean(jnp.maximum(pg1, pg2), mask)
  v_clipped = old_values + jnp.clip(values - old_values, -value_clip, value_clip)
  vf1 = jnp.square(values - returns)
  vf2 = jnp.square(v_clipped - returns)
  vf_loss = 0.5 * rl.masked_mean(jnp.maximum(vf1, vf2), mask)
  metrics = {
      "policy/clipfrac": rl.masked_mean((pg2 > pg1).astype(jnp.float32), mask),
      "policy/approxkl": 0.5 * rl.masked_mean(jnp.square(log_ratio), mask),
      "policy/ratio_mean": rl.masked_mean(ratio, mask),
      "policy/ratio_max_abs_dev": jnp.max(jnp.abs(ratio - 1.0) * mask),
      "value/clipfrac": rl.masked_mean((vf2 > vf1).astype(jnp.float32), mask),
  }
  return pg_loss, vf_loss, metrics


KL_ESTIMATORS = ("sampled", "exact")


@dataclasses.dataclass
class PPO(rl.RLAlgorithm):
  """PPO with a value head on the policy and a frozen reference."""

  gamma: float = 1.0
  lam: float = 0.95
  clip_eps: float = 0.2
  value_clip: float = 0.2
  vf_coef: float = 0.1
  entropy_coef: float = 0.0
  whiten_advantages: bool = True
  num_epochs: int = 4
  num_minibatches: int = 4
  kl_estimator: str = "sampled"  # or "exact" (see the module docstring)
  output_head: str = "lm+scalar"
  name = "ppo"

  def __post_init__(self):
    super().__post_init__()
    if self.kl_estimator not in KL_ESTIMATORS:
      raise UserError(f"PPO.kl_estimator must be one of {KL_ESTIMATORS}, got "
                      f"{self.kl_estimator!r}")

  def prepare(self, params, batch, rng, aux=None, frozen=None):
    beta = aux["beta"]
    inputs = batch["inputs"]
    exact = self.kl_estimator == "exact"
    roll = self.rollout(params, frozen, inputs, rng, keep_ref_logits=exact)
    mask = roll["mask"]
    if exact:
      rewards = rl.future_kl_rewards(roll["scores"], roll["kl"], mask, roll["lengths"], beta)
    else:
      rewards = rl.kl_penalised_rewards(roll["scores"], roll["logp"], roll["ref_logp"], mask,
                                        roll["lengths"], beta)
    adv, returns = rl.gae(rewards, roll["values"], mask, self.gamma, self.lam)
    metrics = self.rollout_metrics(roll, beta)
    metrics["value/mean"] = rl.masked_mean(roll["values"], mask)
    metrics["value/returns_mean"] = rl.masked_mean(returns, mask)
    scale = jnp.ones((), jnp.float32)
    if self.whiten_advantages:
      # NOTE: whitening divides the surrogate by the advantages' std; the
      # analytic KL term of the exact estimator is divided by the same, so the
      # two parts of the objective's gradient keep their ratio.
      var = rl.masked_mean(jnp.square(adv - rl.masked_mean(adv, mask)), mask)
      scale = jax.lax.rsqrt(var + 1e-8)
      adv = rl.masked_whiten(adv, mask)
    prepared = {"inputs": inputs, "tokens": roll["tokens"], "mask": mask,
                "old_logp": roll["logp"], "old_values": roll["values"],
                "advantages": adv, "returns": returns}
    if exact:
      prepared["ref_logits"] = roll["ref_logits"]
      prepared["kl_coef"] = jnp.full(inputs.shape[:1], beta * scale, jnp.float32)
    return prepared, metrics

  def loss(self, params, batch, rng, aux=None, frozen=None):
    del rng, aux, frozen  # NOTE: no dropout (see the module docstring)
    mask = batch["mask"]
    out = self.anchored.policy_outputs(params, batch["inputs"], batch["tokens"])
    logp = policy_lib.logprobs_from_logits(out["logits"], batch["tokens"],
                                           self.anchored.pad_id) * mask
    pg_loss, vf_loss, metrics = ppo_losses(
        logp, batch["old_logp"], batch["advantages"], out["values"] * mask,
        batch["old_values"], batch["returns"], mask, clip_eps=self.clip_eps,
        value_clip=self.value_clip)
    loss = pg_loss + self.vf_coef * vf_loss
    if "kl_coef" in batch:
      # the exact estimator's analytic term: beta sum_t KL_t(s_t), states held fixed
      kl_t, _ = policy_lib.full_kl_and_entropy(out["logits"], batch["ref_logits"],
                                               self.anchored.pad_id)
      kl_loss = rl.masked_mean(kl_t * batch["kl_coef"][:, None], mask)
      loss = loss + kl_loss
      metrics["loss/kl"] = kl_loss
    if self.entropy_coef:
      _, ent = policy_lib.full_kl_and_entropy(out["logits"], out["logits"])
      entropy = rl.masked_mean(ent, mask)
      loss = loss - self.entropy_coef * entropy
      metrics["policy/entropy"] = entropy
    metrics.update({"loss/policy": pg_loss, "loss/value": vf_loss})
    return loss, metrics
