"""What PPO and vanilla policy gradient share: rollouts, KL, GAE, the KL controller.

The objective is eq. 1 of the DeRa paper,
  max_pi E_x E_{y ~ pi(.|x)} r(x, y) - beta KL(pi(.|x) || pi_ref(.|x)).

A rollout (inside the jitted `Algorithm.prepare`) samples one response per
prompt with THE sampler (`decoding.sampler.generate`) at temperature 1 with
no top-k/top-p, then runs one teacher-forced pass of the policy (old
log-probs, values) and one of the frozen reference over the sampled tokens.
NOTE: the KL comes from those two passes rather than from a two-model
`MixedLogits` rollout: the policy pass is needed anyway (values, and old
log-probs computed exactly as the loss computes new ones, which makes the
first PPO ratio exactly 1), and a teacher-forced reference pass is one
parallel pass instead of a second model inside the sequential loop.

Per-token quantities are [B, T] with T = max_new_tokens and a mask of the
first `lengths[b]` positions (the sampled tokens, EOS included).
"""

import dataclasses
import functools
from typing import Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np

from realign_jax.plumbing import config_check
from realign_jax.checkpoints.run_dir import RunRecord
from realign_jax.data import pipeline
from realign_jax.data import vocab as vocab_lib
from realign_jax.decoding import sampler
from realign_jax.plumbing.errors import UserError
from realign_jax.models.api import LanguageModel
from realign_jax.parallel import multihost
from realign_jax.parallel import partitioning
from realign_jax.rewards import base as rewards_base
from realign_jax.training import policy as policy_lib
from realign_jax.training.trainer import Algorithm


# ---- masked statistics ---------------------------------------------------------
def masked_sum(x, mask, axis=None):
  return jnp.sum(x * mask, axis=axis)


def masked_mean(x, mask, axis=None):
  return masked_sum(x, mask, axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)


def masked_whiten(x, mask, eps: float = 1e-8):
  """(x - mean) / std over the masked entries; 0 outside the mask."""
  mean = masked_mean(x, mask)
  var = masked_mean(jnp.square(x - mean), mask)
  return (x - mean) * jax.lax.rsqrt(var + eps) * mask


# ---- returns and advantages ---------------------------------------------------
def gae(rewards, values, mask, gamma: float, lam: float):
  """Generalised advantage estimation (Schulman et al. 2016) along each response.

  A_t = sum_k (gamma lam)^k delta_{t+k},  delta_t = r_t + gamma V_{t+1} - V_t,
  with V = 0 after the last real token (the episode ends there).

  Args:
    rewards, values, mask: [B, T]; mask is 1 on a prefix of each row.
    gamma, lam: discount and GAE lambda.

  Returns:
    (advantages, returns = advantages + values), both [B, T], 0 outside the mask.
  """
  rewards, values, mask = (jnp.asarray(a, jnp.float32) for a in (rewards, values, mask))
  values = values * mask
  next_values = jnp.pad(values[:, 1:], ((0, 0), (0, 1)))
  deltas = (rewards + gamma * next_values - values) * mask

  def back(carry, xs):
    delta, m = xs
    adv = (delta + gamma * lam * carry) * m
    return adv, adv
  _, adv = jax.lax.scan(back, jnp.zeros(rewards.shape[0], jnp.float32),
                        (deltas.T, mask.T), reverse=True)
  adv = adv.T
  return adv, (adv + values) * mask


def kl_penalised_rewards(scores, logp, ref_logp, mask, lengths, beta):
  """Per-token rewards: -beta (log pi - log pi_ref), plus the task score at the last token.

  [B], [B, T], [B, T], [B, T], [B], scalar -> [B, T].
  """
  t = logp.shape[1]
  last = jax.nn.one_hot(jnp.maximum(lengths, 1) - 1, t, dtype=jnp.float32)
  return (-beta * (logp - ref_logp) + scores[:, None] * last) * mask


def future_kl_rewards(scores, kl, mask, lengths, beta):
  """Per-token rewards of the exact-KL estimator: -beta KL_{t+1}, plus the task score at the last token.

  kl [B, T] is the exact full-vocabulary KL(pi(.|s_t) || pi_ref(.|s_t)) at each
  response position. The sequence KL is E_pi sum_t KL_t(s_t); its gradient is
  E sum_t grad KL_t(s_t) (states held fixed: the loss's analytic term) plus the
  score-function term in which KL_t(s_t), a function of y_{<t}, is a reward of
  the action y_{t-1} that led to s_t. So action t is charged the next state's
  KL, never its own (the loss differentiates that one).
  [B], [B, T], [B, T], [B], scalar -> [B, T].
  """
  t = kl.shape[1]
  last = jax.nn.one_hot(jnp.maximum(lengths, 1) - 1, t, dtype=jnp.float32)
  next_kl = jnp.pad((kl * mask)[:, 1:], ((0, 0), (0, 1)))
  return (-beta * next_kl + scores[:, None] * last) * mask


# ---- adaptive KL controller -----------------------------------------------------
def adaptive_beta(beta, kl, kl_target: float, horizon: float, n_steps: float):
  """Ziegler et al. (2019): beta <- beta (1 + clip(KL / target - 1, -0.2, 0.2) n / horizon)."""
  err = jnp.clip(kl / kl_target - 1.0, -0.2, 0.2)
  return beta * (1.0 + err * n_steps / horizon)


# ---- the shared algorithm base ---------------------------------------------------
@dataclasses.dataclass
class RLAlgorithm(Algorithm):
  """A policy trained on rollouts against a frozen reference and a reward.

  Subclasses set `output_head`, implement `prepare`/`loss`, and may extend
  `init_aux`/`update_aux`.
  """

  model: LanguageModel = None
  reward: rewards_base.Reward = None
  init_checkpoint: Optional[str] = None
  beta: float = 0.1
  kl_target: Optional[float] = None  # None: fixed beta; else the adaptive controller
  kl_horizon: float = 10000.0
  task: str = "builtin_summarize"
  batch_size: int = 32
  input_length: int = 128
  max_new_tokens: int = 32
  data_dir: Optional[str] = None
  vocab_path: Optional[str] = None
  data_seed: int = 0
  init_seed: int = 0  # the start (and reference) when there is no INIT_CHECKPOINT
  eval_split: str = "validation"
  max_eval_examples: int = 64
  num_eval_samples: int = 3
  eval_seed: int = 1234
  output_head: str = "lm"

  def __post_init__(self):
    config_check.check_config(self)  # NOTE: before the comparisons below (beta='0.1')
    if self.model is None:
      raise UserError(f"{type(self).__name__}.model is not set")
    if self.reward is None:
      raise UserError(f"{type(self).__name__}.reward is not set")
    if not self.beta >= 0:
      raise UserError(f"beta must be >= 0, got {self.beta}")
    if self.kl_target is not None and not self.kl_target > 0:
      raise UserError(f"kl_target must be > 0 (or None for a fixed beta), got {self.kl_target}")
    # NOTE: the head is the algorithm's choice (PPO's value head), not the config's.
    self.model = LanguageModel(self.model.config, self.output_head)
    self.anchored = policy_lib.AnchoredPolicy(self.model)
    self.sampling = sampler.SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=1.0)
    self._vocab = None
    self._mesh = None
    self._frozen = None

  # ---- setup ------------------------------------------------------------------
  @property
  def vocab(self):
    if self._vocab is None:
      self._vocab = vocab_lib.load_vocabulary(self.vocab_path)
    return self._vocab

  def setup(self, mesh, rules):
    self._mesh, self._rules = mesh, rules
    if self.batch_size % jax.process_count():
      raise UserError(f"batch_size {self.batch_size} not divisible by {jax.process_count()} hosts")
    if self.init_checkpoint:
      policy_lib.check_init_checkpoint(self.init_checkpoint, self.model.config)
    self.reward.setup(mesh, rules)
    self._frozen = None

  def run_record(self) -> RunRecord:
    return RunRecord(model=self.model, vocab_path=self.vocab_path,
                     init_checkpoint=self.init_checkpoint, batch_size=self.batch_size)

  def init(self, rng):
    return self.model.init(rng)

  def _abstract(self, lm):
    abstract, axes = lm.abstract_init()
    shardings = partitioning.logical_to_mesh_sharding(axes, self._mesh, self._rules)
    return jax.tree_util.tree_map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract, shardings)

  def _start_params(self, lm):
    """INIT_CHECKPOINT's params (value head fresh), else a seeded init; sharded."""
    target = self._abstract(lm)
    if self.init_checkpoint:
      return policy_lib.load_init_params(self.init_checkpoint, target, config=lm.config)
    shardings = jax.tree_util.tree_map(lambda s: s.sharding, target)
    return jax.jit(lambda r: lm.init(r)[0], out_shardings=shardings)(
        jax.random.PRNGKey(self.init_seed))

  def initial_params(self, abstract_params):
    del abstract_params
    return self._start_params(self.model)

  def frozen(self):
    if self._frozen is None:
      ref = self._start_params(self.anchored.reference_lm)
      self._frozen = {"reference": ref, "reward": self.reward.params()}
    return self._frozen

  def init_aux(self, params):
    del params
    return {"beta": jnp.asarray(self.beta, jnp.float32)}

  def update_aux(self, aux, params, metrics, step):
    del params, step
    if self.kl_target is None:
      return aux
    beta = adaptive_beta(aux["beta"], metrics["objective/kl"], self.kl_target, self.kl_horizon,
                         self.batch_size)
    return dict(aux, beta=beta)

  # ---- data -------------------------------------------------------------------
  def batches(self, start_step: int) -> Iterator[dict]:
    # NOTE: the same global batch on every process, cut to its rows (as SFT).
    it = pipeline.batch_iterator(
        self.task, "train", batch_size=self.batch_size,
        input_length=self.input_length, target_length=self.max_new_tokens,
        seed=self.data_seed, shuffle=True, repeat=True, data_dir=self.data_dir,
        vocab_path=self.vocab_path, start_step=start_step)
    return multihost.host_rows(({"inputs": b["inputs"]} for b in it), self._mesh,
                               self.batch_size)

  # ---- rollouts ---------------------------------------------------------------
  def rollout(self, params, frozen, inputs, rng, keep_ref_logits: bool = False):
    """Samples one response per prompt and scores it (traceable).

    Returns a dict: tokens [B, T], lengths [B], mask [B, T], logp / ref_logp
    [B, T] (sampled tokens under the policy / reference), kl / entropy [B, T]
    (exact, over the full vocabulary, per position), scores [B], the
    policy's "values" [B, T] when it has a value head, and the reference's
    "ref_logits" [B, T, V] with `keep_ref_logits`.
    """
    out = sampler.generate(self.model, params, inputs, rng, self.sampling)
    tokens, lengths = out.tokens, out.lengths
    mask = policy_lib.length_mask(lengths, tokens.shape[1])
    pol = self.anchored.policy_outputs(params, inputs, tokens)
    ref_logits = self.anchored.reference_logits(frozen["reference"], inputs, tokens)
    pad = self.anchored.pad_id
    logp = policy_lib.logprobs_from_logits(pol["logits"], tokens, pad) * mask
    ref_logp = policy_lib.logprobs_from_logits(ref_logits, tokens, pad) * mask
    kl, entropy = policy_lib.full_kl_and_entropy(pol["logits"], ref_logits, pad)
    scores = self.reward.score_tokens(frozen["reward"], inputs, tokens, lengths)
    roll = {"tokens": tokens, "lengths": lengths, "mask": mask, "logp": logp,
            "ref_logp": ref_logp, "kl": kl * mask, "entropy": entropy * mask,
            "scores": scores.astype(jnp.float32)}
    if "values" in pol:
      roll["values"] = pol["values"] * mask
    if keep_ref_logits:
      roll["ref_logits"] = ref_logits
    return jax.lax.stop_gradient(roll)

  def rollout_metrics(self, roll, beta) -> dict:
    """The objective's terms averaged over the batch (sequence-level sums)."""
    finite = jnp.isfinite(roll["scores"])
    kl_seq = jnp.sum(roll["kl"], axis=-1)
    return {
        "objective/reward": jnp.mean(roll["scores"]),
        "objective/reward_nonfinite": jnp.sum(~finite).astype(jnp.float32),
        "objective/kl": jnp.mean(kl_seq),
        "objective/kl_sampled": jnp.mean(jnp.sum(roll["logp"] - roll["ref_logp"], axis=-1)),
        "objective/entropy": jnp.mean(jnp.sum(roll["entropy"], axis=-1)),
        "objective/regularised": jnp.mean(roll["scores"] - beta * kl_seq),
        "objective/beta": jnp.asarray(beta, jnp.float32),
        "response/length": jnp.mean(roll["lengths"].astype(jnp.float32)),
    }

  def check_step(self, metrics, step: int) -> None:
    bad = float(metrics.get("objective/reward_nonfinite", 0.0))
    if bad:
      raise UserError(f"the reward {self.reward.name!r} returned NaN or inf for {int(bad)} of "
                      f"{self.batch_size} responses at step {step}; stopped without saving")
    kl = float(metrics.get("objective/kl", 0.0))
    if not np.isfinite(kl):
      raise UserError(f"the KL to the reference became {kl} at step {step}; stopped without "
                      "saving")

  # ---- eval -------------------------------------------------------------------
  @functools.cached_property
  def _eval_fn(self):
    def run(params, frozen, inputs, rng):
      roll = self.rollout(params, frozen, inputs, rng)
      return {"reward": roll["scores"], "kl": jnp.sum(roll["kl"], axis=-1),
              "length": roll["lengths"], "tokens": roll["tokens"]}
    return jax.jit(run)

  def eval_inputs(self) -> np.ndarray:
    batch = next(pipeline.eval_batches(
        self.task, self.eval_split, batch_size=self.max_eval_examples,
        input_length=self.input_length, target_length=self.max_new_tokens,
        data_dir=self.data_dir, vocab_path=self.vocab_path, limit=self.max_eval_examples))
    return batch["inputs"][batch["weights"] > 0]

  def evaluate(self, params, step, aux=None):
    """Mean reward, exact KL and length of one sample per eval prompt (fixed seed).

    "regularised" is reward - beta KL at the CURRENT beta (`aux["beta"]`: the
    adaptive controller's value when kl_target is set), reported as "beta".
    """
    if not self.max_eval_examples:
      return {}, []
    inputs = self.eval_inputs()
    # NOTE: per-prompt outputs of a program on the global mesh: on several hosts
    # they are spread over the processes, and every process needs all of them.
    out = multihost.fetch(self._eval_fn(params, self.frozen(), jnp.asarray(inputs),
                                        jax.random.PRNGKey(self.eval_seed)))
    # NOTE: the objective the policy is trained on at this step: with adaptive
    # KL control the initial self.beta is stale after the first update.
    beta = float(aux["beta"]) if aux is not None and "beta" in aux else float(self.beta)
    se = lambda x: float(np.std(x, ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")
    j = out["reward"] - beta * out["kl"]
    metrics = {"reward": float(np.mean(out["reward"])), "kl": float(np.mean(out["kl"])),
               "reward_se": se(out["reward"]), "kl_se": se(out["kl"]),
               "length": float(np.mean(out["length"])),
               "regularised": float(np.mean(j)), "regularised_se": se(j), "beta": beta}
    samples = []
    t = self.model.config.tokens
    for i in range(min(self.num_eval_samples, len(inputs))):
      samples.append({
          "prompt": vocab_lib.decode(self.vocab, [x for x in inputs[i].tolist()
                                                  if x != t.pad_id])[:300],
          "sample": vocab_lib.decode(self.vocab, rewards_base.strip_ids(
              out["tokens"][i], int(out["length"][i]), t.eos_id, t.pad_id)),
          "reward": float(out["reward"][i])})
    return metrics, samples
