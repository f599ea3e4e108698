"""Value functions for controlled decoding: CD-FUDGE and CD-Q, through the one trainer.

Both learn the value of the reference p under a reward r (the talk's MDP:
reward r(x, y) at EOS, 0 before):
  V*([x, y^t]) = E_{z ~ p} r([x, y^t, z...]) for a non-terminal prefix,
  V*([x, y]) = r(x, y) when y ends (at EOS, or cut at the length limit: the
  episode ends there, and the reward is that of the cut response).

Data: responses y ~ p (temperature 1, no truncation) sampled inside the
jitted `prepare` with THE sampler from the frozen reference, scored by any
`rewards.base.Reward` (length, learned reward model, gold; text rewards run
as a host callback).

CD-FUDGE (value model = output_head "scalar"):
  loss = E 1/2 sum_{t=1..|y|} (V([x, y^t]) - r(x, y))^2.
With the convention of `decoding/controlled.py`, V([x, y^t]) is
forward(inputs, [y, pad])["values"][:, t] (index t = after t tokens).

CD-Q (Q-head = output_head "lm", logits read as Q(s)[z] = V([s, z])):
  loss = E 1/2 sum_{t=0..|y|-1} (Q(s_t)[y_t] - v_t)^2,  s_t = [x, y^{<t}],
  v_t = sum_z p(z | s_{t+1}) Q_target(s_{t+1})[z] if y_t is not the last token,
  v_t = r(x, y) if it is (EOS, or the length limit).
The target network Q_target lives in the trainer's `aux` (checkpointed with
the state): an EMA of the params (target_ema in (0, 1]) or a copy every
`target_period` steps (target_ema = 0). Both p(. | s_{t+1}) and
Q_target(s_{t+1}) come from one teacher-forced pass each in `prepare`.

The dueling Q-head (output_head "lm+scalar:dueling", the default): the
scalar head is V(s), the logits are advantages A(s, z), and
  Q(s, z) = V(s) + A(s, z) - sum_z' p(z' | s) A(s, z'),
so sum_z p(z | s) Q(s, z) = V(s) exactly and the bootstrap above is
V_target(s_{t+1}). A token no sampled response took keeps an advantage near
its zero start, so its Q is near V(s), the value of continuing with p, not the
optimistic 0 of a plain Q-head when rewards are <= 0 (with the plain head,
full-vocabulary CD-Q followed such tokens at small beta: 58.7 nats at
beta = 0.1 in the frontier study). The gauge (adding c to every A(s, .)
changes no Q) is pinned by
  gauge_weight * 1/2 sum_t (sum_z p(z | s_t) A(s_t, z))^2.
The advantages are shrunk toward 0 by
  advantage_l2 * 1/2 sum_t sum_z A(s_t, z)^2:
a token's output row is shared by every state, so a token drawn a few times
anywhere gets a noisy advantage everywhere, and the tokens p rarely draws get
gradients of order p(z | s) through the centering, which Adam's per-parameter
normalisation turns into full-size steps (on the tiny MDP without the penalty
a never-drawn token's A drifted to +0.1 in 300 steps). The penalty trades
reward for KL at small beta (frontier study, full vocabulary, beta = 0.03:
advantage_l2 = 1e-3 gave 35.9 nats, 1e-2 10.8 nats at reward -0.23, 3e-2
2.2 nats at -0.44; a semi-gradient variant, the TD error reaching only the
taken token, left the advantages too small to steer). p is the reference
without pad (`sampler.mask_pad`), as it samples.

Losses are sums over a response's tokens, averaged over the batch.
"""

import dataclasses
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np

from realign_jax.plumbing import config_check
from realign_jax.checkpoints.run_dir import RunRecord
from realign_jax.data import pipeline
from realign_jax.decoding import sampler
from realign_jax.plumbing.errors import UserError
from realign_jax.models.api import LanguageModel
from realign_jax.models.heads import DUELING_Q
from realign_jax.parallel import multihost
from realign_jax.parallel import partitioning
from realign_jax.rewards import base as rewards_base
from realign_jax.training import policy as policy_lib
from realign_jax.training.trainer import Algorithm


def extend(tokens):
  """[B, T] -> [B, T + 1] with a pad column, so forward yields T + 1 prefixes."""
  return jnp.pad(tokens, ((0, 0), (0, 1)))


def length_mask(lengths, t: int):
  return (jnp.arange(t)[None] < lengths[:, None]).astype(jnp.float32)


# ---- losses (pure functions of arrays) ---------------------------------------------
def fudge_loss(values, rewards, mask):
  """values [B, T] = V([x, y^t]) for t = 1..T, rewards [B], mask [B, T]."""
  err = (values - rewards[:, None]) * mask
  return jnp.mean(0.5 * jnp.sum(jnp.square(err), axis=1))


def _probs(ref_logits, pad_id: int = sampler.PAD_ID):
  """p without pad; 0 where a row has no finite logit (positions past the response)."""
  p = jax.nn.softmax(sampler.mask_pad(ref_logits, pad_id), axis=-1)
  return jnp.where(jnp.isfinite(p), p, 0.0)


def cdq_targets(ref_logits_next, target_q_next, rewards, mask, lengths,
                pad_id: int = sampler.PAD_ID):
  """v_t for t = 0..T-1.

  Args:
    ref_logits_next: [B, T, V] logits of p(. | s_{t+1}).
    target_q_next: [B, T, V] Q_target(s_{t+1})[.].
    rewards: [B]; mask: [B, T]; lengths: [B].
  """
  p = _probs(ref_logits_next, pad_id)
  boot = jnp.sum(p * target_q_next.astype(jnp.float32), axis=-1)  # [B, T]
  return bellman_targets(boot, rewards, mask, lengths)


def bellman_targets(boot, rewards, mask, lengths):
  """v_t = boot[:, t] = V(s_{t+1}) before the last token, r(x, y) at it; 0 after."""
  last = jnp.arange(mask.shape[1])[None] == (lengths[:, None] - 1)
  return jnp.where(last, rewards[:, None], boot.astype(jnp.float32)) * mask


def dueling_q_taken(values, advantages, ref_logits, tokens, pad_id: int = sampler.PAD_ID):
  """Q(s_t, y_t) = V(s_t) + A(s_t, y_t) - E_{z ~ p(. | s_t)} A(s_t, z), and E_p A.

  values [B, T], advantages / ref_logits [B, T, V] (p without pad), tokens [B, T].
  """
  adv = advantages.astype(jnp.float32)
  p = _probs(ref_logits, pad_id)
  mean_adv = jnp.sum(p * adv, axis=-1)  # [B, T]
  taken = jnp.take_along_axis(adv, tokens[..., None], axis=-1)[..., 0]
  return values.astype(jnp.float32) + taken - mean_adv, mean_adv


def cdq_loss(q_logits, tokens, targets, mask):
  """q_logits [B, T, V] = Q(s_t)[.], tokens [B, T], targets v_t [B, T]."""
  q = jnp.take_along_axis(q_logits.astype(jnp.float32), tokens[..., None], axis=-1)[..., 0]
  return td_loss(q, targets, mask)


def td_loss(q_taken, targets, mask):
  """E 1/2 sum_t (Q(s_t, y_t) - v_t)^2 over the response's tokens."""
  return jnp.mean(0.5 * jnp.sum(jnp.square((q_taken - targets) * mask), axis=1))


# The parameter collections that hold the value output of each value-model head
# (a Q-head's is the LM output layer: T5's logits_dense, the decoder's lm_head).
VALUE_OUTPUT = {"scalar": (policy_lib.VALUE_HEAD,), "lm+scalar": (policy_lib.VALUE_HEAD,),
                "lm": ("logits_dense", "lm_head"),
                DUELING_Q: (policy_lib.VALUE_HEAD, "logits_dense", "lm_head")}


# ---- the algorithms --------------------------------------------------------------------
@dataclasses.dataclass
class ValueAlgorithm(Algorithm):
  """Shared: the reference p, the reward, prompts, on-the-fly samples y ~ p.

  `reference_checkpoint` is a run directory of the reference (e.g. SFT).
  `init_checkpoint` (optional) is a run directory whose language model (of the
  value model's architecture) gives the value model's trunk; the value output
  starts at zero: a fresh scalar head, or, for a Q-head, a zeroed output layer
  (the LM head's logits are not values). Without it the value model starts
  from a seeded init.
  Programmatic use may pass `reference` (an object with `.lm` and `.params`)
  and `token_reward` `(inputs, responses, lengths) -> [B]` instead, and
  `prompts` ([N, Li] ids, cycled) instead of the task's prompts.
  """

  model: LanguageModel = None
  reward: Optional[rewards_base.Reward] = None
  reference_checkpoint: Optional[str] = None
  init_checkpoint: Optional[str] = None
  task: str = "builtin_summarize"
  batch_size: int = 32
  input_length: int = 96
  max_new_tokens: int = 24
  data_dir: Optional[str] = None
  vocab_path: Optional[str] = None
  data_seed: int = 0
  init_seed: int = 0
  reference: Any = None
  token_reward: Optional[Callable] = None
  prompts: Optional[np.ndarray] = None
  output_head: str = "scalar"
  name: str = "value"

  def __post_init__(self):
    config_check.check_config(self)  # NOTE: before the comparisons below
    if self.model is None:
      raise UserError(f"{type(self).__name__}.model is not set")
    if self.reward is None and self.token_reward is None:
      raise UserError(f"{type(self).__name__}.reward is not set")
    if self.reference is None and not self.reference_checkpoint:
      raise UserError(f"{type(self).__name__}.reference_checkpoint is not set")
    if isinstance(self.model, LanguageModel):
      # NOTE: the head is the algorithm's choice, whatever the gin model says.
      self.model = LanguageModel(self.model.config, self.output_head)
    self.sampling = sampler.SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=1.0)
    self._frozen = None
    self._ref_lm = self.reference.lm if self.reference is not None else None

  # ---- setup ------------------------------------------------------------------
  def setup(self, mesh, rules):
    self._mesh, self._rules = mesh, rules
    if self.reference is None:
      config, _ = policy_lib.check_init_checkpoint(self.reference_checkpoint,
                                                   what="reference_checkpoint")
      self._ref_lm = LanguageModel(config, "lm")
    if self._ref_lm.vocab_size != self.model.vocab_size:
      raise UserError(f"the value model's vocabulary ({self.model.vocab_size}) differs from the "
                      f"reference's ({self._ref_lm.vocab_size}"
                      f"{', ' + self.reference_checkpoint if self.reference_checkpoint else ''})")
    if self.init_checkpoint:
      policy_lib.check_init_checkpoint(self.init_checkpoint, self.model.config,
                                       what="init_checkpoint")
      if "lm" in self.output_head and self.output_head != "lm+scalar" and \
          self.model.config.tie_embeddings:
        raise UserError(f"init_checkpoint {self.init_checkpoint}: a Q-head value model with tied "
                        f"embeddings would read the LM's logits as values; untie them or drop "
                        f"init_checkpoint")
    if self.reward is not None:
      self.reward.setup(mesh, rules)
    self._frozen = None

  def run_record(self) -> RunRecord:
    return RunRecord(model=self.model, vocab_path=self.vocab_path,
                     init_checkpoint=self.init_checkpoint, batch_size=self.batch_size)

  def init(self, rng):
    return self.model.init(rng)

  def _sharded_abstract(self, lm: LanguageModel):
    """ShapeDtypeStructs of `lm`'s params with their shardings on this run's mesh."""
    abstract, axes = lm.abstract_init()
    sh = partitioning.logical_to_mesh_sharding(axes, self._mesh, self._rules)
    return jax.tree_util.tree_map(
        lambda s, h: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=h), abstract, sh)

  def initial_params(self, abstract_params):
    """init_checkpoint's trunk with a zero value output, sharded like `abstract_params`."""
    if not self.init_checkpoint:
      return None
    target = self._sharded_abstract(LanguageModel(self.model.config, "lm"))
    trunk = policy_lib.load_init_params(self.init_checkpoint, target, config=self.model.config,
                                        what="init_checkpoint")
    zeros = lambda s: jax.device_put(jnp.zeros(s.shape, s.dtype), s.sharding)
    # NOTE: every leaf not in the LM (the scalar head) and the Q-head's output
    # layer start at zero, so V = 0 and Q = 0 before the first step.
    heads = VALUE_OUTPUT[self.output_head]
    return {k: (jax.tree_util.tree_map(zeros, v) if k in heads or k not in trunk else trunk[k])
            for k, v in abstract_params.items()}

  def frozen(self):
    if self._frozen is None:
      if self.reference is not None:
        ref = self.reference.params
      else:
        target = self._sharded_abstract(self._ref_lm)
        ref = policy_lib.load_init_params(self.reference_checkpoint, target,
                                          config=self._ref_lm.config,
                                          what="reference_checkpoint")
      self._frozen = {"reference": ref,
                      "reward": self.reward.params() if self.reward is not None else None}
    return self._frozen

  # ---- data -------------------------------------------------------------------
  def batches(self, start_step: int) -> Iterator[dict]:
    if self.prompts is not None:
      prompts = np.asarray(self.prompts, np.int32)

      def cycle():
        rng = np.random.default_rng(self.data_seed + start_step)
        while True:
          yield {"inputs": prompts[rng.integers(0, len(prompts), self.batch_size)]}
      return cycle()
    # NOTE: the same global batch on every process, cut to its rows (as SFT).
    it = pipeline.batch_iterator(
        self.task, "train", batch_size=self.batch_size,
        input_length=self.input_length, target_length=self.max_new_tokens,
        seed=self.data_seed, shuffle=True, repeat=True, data_dir=self.data_dir,
        vocab_path=self.vocab_path, start_step=start_step)
    return multihost.host_rows(({"inputs": b["inputs"]} for b in it), self._mesh,
                               self.batch_size)

  def num_tokens(self, batch) -> int:
    return int(np.sum(np.asarray(batch["inputs"]) != sampler.tokens_of(self.model).pad_id))

  # ---- rollouts ---------------------------------------------------------------
  def _score(self, frozen, inputs, tokens, lengths):
    if self.token_reward is not None:
      return self.token_reward(inputs, tokens, lengths)
    return self.reward.score_tokens(frozen["reward"], inputs, tokens, lengths)

  def sample(self, frozen, inputs, rng):
    """y ~ p and r(x, y): tokens [B, T], lengths [B], rewards [B], mask [B, T]."""
    out = sampler.generate(self._ref_lm, frozen["reference"], inputs, rng, self.sampling)
    rewards = self._score(frozen, inputs, out.tokens, out.lengths).astype(jnp.float32)
    mask = length_mask(out.lengths, out.tokens.shape[1])
    return {"tokens": out.tokens, "lengths": out.lengths, "rewards": rewards, "mask": mask}

  def sample_metrics(self, roll) -> dict:
    return {"reward/mean": jnp.mean(roll["rewards"]),
            "reward/nonfinite": jnp.sum(~jnp.isfinite(roll["rewards"])).astype(jnp.float32),
            "response/length": jnp.mean(roll["lengths"].astype(jnp.float32))}

  def check_step(self, metrics, step: int) -> None:
    bad = float(metrics.get("reward/nonfinite", 0.0))
    if bad:
      name = self.reward.name if self.reward is not None else "token_reward"
      raise UserError(f"the reward {name!r} returned NaN or inf for {int(bad)} of "
                      f"{self.batch_size} responses at step {step}; stopped without saving")


@dataclasses.dataclass
class FudgeValue(ValueAlgorithm):
  """CD-FUDGE: regress V([x, y^t]) on r(x, y) for every prefix of y ~ p."""

  output_head: str = "scalar"
  name: str = "cd_fudge"

  def prepare(self, params, batch, rng, aux=None, frozen=None):
    del params, aux
    roll = self.sample(frozen, batch["inputs"], rng)
    return dict(batch, **roll), self.sample_metrics(roll)

  def loss(self, params, batch, rng, aux=None, frozen=None):
    del rng, aux, frozen
    values = self.model.forward(params, batch["inputs"], extend(batch["tokens"]))["values"]
    v = values[:, 1:].astype(jnp.float32)  # V([x, y^t]), t = 1..T
    loss = fudge_loss(v, batch["rewards"], batch["mask"])
    n = jnp.maximum(jnp.sum(batch["mask"]), 1.0)
    return loss, {"value/mean": jnp.sum(v * batch["mask"]) / n,
                  "value/mse_per_token": 2 * loss * batch["mask"].shape[0] / n}


@dataclasses.dataclass
class CDQValue(ValueAlgorithm):
  """CD-Q: Bellman backups of a Q-head through p, with a target network in `aux`."""

  output_head: str = DUELING_Q  # or "lm": a plain Q-head, Q(s)[z] = logits
  target_ema: float = 0.0  # > 0: target <- (1 - ema) target + ema params every step
  target_period: int = 10  # with target_ema = 0: copy the params every this many steps
  gauge_weight: float = 1.0  # dueling head: weight of 1/2 (E_p A)^2 per token
  advantage_l2: float = 3e-2  # dueling head: weight of 1/2 sum_z A(s, z)^2 per token
  name: str = "cd_q"

  def __post_init__(self):
    if self.output_head not in ("lm", DUELING_Q):
      raise UserError(f"CDQValue.output_head must be 'lm' (plain Q-head) or {DUELING_Q!r} "
                      f"(dueling), got {self.output_head!r}")
    super().__post_init__()
    for name in ("gauge_weight", "advantage_l2"):
      if not getattr(self, name) >= 0.0:
        raise UserError(f"CDQValue.{name} must be >= 0, got {getattr(self, name)}")
    if not 0.0 <= self.target_ema <= 1.0:
      raise UserError(f"target_ema must be in [0, 1], got {self.target_ema}")
    if self.target_ema == 0.0 and self.target_period < 1:
      raise UserError(f"target_period must be >= 1, got {self.target_period}")

  def init_aux(self, params):
    return {"target": jax.tree_util.tree_map(jnp.asarray, params)}

  def update_aux(self, aux, params, metrics, step):
    del metrics
    if self.target_ema > 0:
      a = self.target_ema
      target = jax.tree_util.tree_map(lambda t, p: (1 - a) * t + a * p, aux["target"], params)
    else:
      copy = (step % self.target_period) == 0
      target = jax.tree_util.tree_map(lambda t, p: jnp.where(copy, p, t), aux["target"], params)
    return {"target": target}

  def prepare(self, params, batch, rng, aux=None, frozen=None):
    del params
    roll = self.sample(frozen, batch["inputs"], rng)
    ext = extend(roll["tokens"])
    ref_logits = self._ref_lm.forward(frozen["reference"], batch["inputs"], ext)["logits"]
    target = self.model.forward(aux["target"], batch["inputs"], ext)
    if self.output_head == DUELING_Q:
      # sum_z p(z | s_{t+1}) Q_target(s_{t+1}, z) = V_target(s_{t+1}) by construction
      v = bellman_targets(target["values"][:, 1:], roll["rewards"], roll["mask"],
                          roll["lengths"])
      extra = {"ref_logits": jax.lax.stop_gradient(ref_logits[:, :-1].astype(jnp.float32))}
    else:
      v = cdq_targets(ref_logits[:, 1:], target["logits"][:, 1:], roll["rewards"], roll["mask"],
                      roll["lengths"], sampler.tokens_of(self.model).pad_id)
      extra = {}
    return (dict(batch, **roll, **extra, value_targets=jax.lax.stop_gradient(v)),
            self.sample_metrics(roll))

  def loss(self, params, batch, rng, aux=None, frozen=None):
    del rng, aux, frozen
    out = self.model.forward(params, batch["inputs"], batch["tokens"])
    mask = batch["mask"]
    n = jnp.maximum(jnp.sum(mask), 1.0)
    metrics = {"value/target_mean": jnp.sum(batch["value_targets"]) / n}
    if self.output_head != DUELING_Q:
      return cdq_loss(out["logits"], batch["tokens"], batch["value_targets"], mask), metrics
    q, mean_adv = dueling_q_taken(out["values"], out["logits"], batch["ref_logits"],
                                  batch["tokens"], sampler.tokens_of(self.model).pad_id)
    loss = td_loss(q, batch["value_targets"], mask)
    gauge = jnp.mean(0.5 * jnp.sum(jnp.square(mean_adv * mask), axis=1))
    adv = out["logits"].astype(jnp.float32)
    # NOTE: the pad's A is never read
    real = jnp.arange(adv.shape[-1]) != sampler.tokens_of(self.model).pad_id
    sq = jnp.sum(jnp.square(adv) * real, axis=-1)  # [B, T]
    l2 = jnp.mean(0.5 * jnp.sum(sq * mask, axis=1))
    metrics.update({"value/td_loss": loss, "value/mean_abs_pmean_advantage":
                    jnp.sum(jnp.abs(mean_adv) * mask) / n,
                    "value/advantage_rms": jnp.sqrt(jnp.sum(sq * mask) / n / adv.shape[-1])})
    return loss + self.gauge_weight * gauge + self.advantage_l2 * l2, metrics
