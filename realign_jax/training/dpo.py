"""DPO (Rafailov et al., 2023) and IPO (Azar et al., 2023) on preference pairs.

With h = (log pi(y_c|x) - log ref(y_c|x)) - (log pi(y_r|x) - log ref(y_r|x)),
sequence log-probs summed over the response tokens (EOS included):

  DPO:  -log sigmoid(beta * h)
  IPO:  (h - 1 / (2 tau))^2        (tau is given as `beta`)

The implicit reward of a response is beta * (log pi - log ref); the metrics
`rewards/{chosen,rejected,margins,accuracies}` are its batch means (accuracy:
the implicit reward ranks chosen strictly above rejected).

The reference is the INIT_CHECKPOINT model, frozen: its params come from
`frozen()` and its log-probs are computed once per batch in `prepare` (under
stop_gradient), or, with `precompute_reference`, once for the whole dataset
before training (then the reference params are not kept at all).
Dropout is off by default, so at the start (policy == reference) the loss is
exactly log 2 and every reward 0.
"""

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from realign_jax.plumbing.errors import UserError
from realign_jax.parallel import multihost
from realign_jax.training import policy as policy_lib
from realign_jax.training.reward_model import (PreferenceAlgorithm, init_params_sharded,
                                               sharded_abstract)

LOSS_TYPES = ("sigmoid", "ipo")


# ---- losses -------------------------------------------------------------------
def pair_logprobs(lm, params, batch, *, dropout_rng=None):
  """(log p(chosen) [B], log p(rejected) [B]) from one forward over the 2B responses."""
  b = batch["inputs"].shape[0]
  inputs = jnp.concatenate([batch["inputs"], batch["inputs"]], axis=0)
  targets = jnp.concatenate([batch["chosen"], batch["rejected"]], axis=0)
  lp = policy_lib.sequence_logprob(lm, params, inputs, targets, dropout_rng=dropout_rng)
  return lp[:b], lp[b:]


def preference_losses(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *,
                      beta: float, loss_type: str = "sigmoid"):
  """Per-pair DPO or IPO losses: four [B] arrays of sequence log-probs -> [B]."""
  h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
  if loss_type == "sigmoid":
    return -jax.nn.log_sigmoid(beta * h)
  if loss_type == "ipo":
    return jnp.square(h - 1.0 / (2.0 * beta))
  raise UserError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def implicit_rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta):
  """beta * (log pi - log ref) for chosen and rejected: ([B], [B]), no gradient."""
  sg = jax.lax.stop_gradient
  return beta * sg(policy_chosen - ref_chosen), beta * sg(policy_rejected - ref_rejected)


def reward_metrics(rc, rr, policy_chosen, policy_rejected):
  """The names researchers know, as batch means."""
  return {"rewards/chosen": jnp.mean(rc), "rewards/rejected": jnp.mean(rr),
          "rewards/margins": jnp.mean(rc - rr),
          "rewards/accuracies": jnp.mean((rc > rr).astype(jnp.float32)),
          "logps/chosen": jnp.mean(jax.lax.stop_gradient(policy_chosen)),
          "logps/rejected": jnp.mean(jax.lax.stop_gradient(policy_rejected))}


# ---- the algorithm ------------------------------------------------------------------
@dataclasses.dataclass
class DPO(PreferenceAlgorithm):
  """DPO / IPO of a T5 or decoder-only policy against its frozen starting point.

  INIT_CHECKPOINT (an SFT run directory) is both the reference and the
  policy's starting point. Without it both are the model's initialisation
  from `reference_seed` (for tests and toy studies).
  """

  beta: float = 0.1
  loss_type: str = "sigmoid"
  precompute_reference: bool = False
  dropout: bool = False
  reference_seed: int = 0
  name: str = "dpo"

  def __post_init__(self):
    super().__post_init__()
    self._ref = None
    self._precomputed = {}

  # ---- setup ----------------------------------------------------------------
  def setup(self, mesh, rules):
    if self.loss_type not in LOSS_TYPES:
      raise UserError(f"DPO.loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
    if not self.beta > 0:
      raise UserError(f"DPO.beta must be > 0, got {self.beta}")
    if self.model.output_head != "lm":
      raise UserError(f"DPO trains a plain language model (output_head 'lm'), got "
                      f"{self.model.output_head!r}")
    super().setup(mesh, rules)
    self._ref = self._reference_params()
    if self.precompute_reference:
      for split in ("train", self.eval_split):
        arrays = self.split_arrays(split)
        if arrays is not None:
          self._precomputed[split] = self._score_split(arrays)
      logging.info("precomputed reference log-probs for %s",
                   {k: len(v["ref_chosen"]) for k, v in self._precomputed.items()})
      self._ref = None  # NOTE: not needed any more; frees its memory.

  def _reference_params(self):
    if self.init_checkpoint:
      abstract = sharded_abstract(self.anchored.reference_lm, self._mesh, self._rules)
      return policy_lib.load_init_params(self.init_checkpoint, abstract,
                                         config=self.model.config)
    logging.warning("DPO without INIT_CHECKPOINT: the reference is the model's random "
                    "initialisation (reference_seed %d)", self.reference_seed)
    return init_params_sharded(self.model, self._mesh, self._rules, self.reference_seed)

  def init(self, rng):
    return self.model.init(rng)

  def initial_params(self, abstract_params):
    # NOTE: loaded again rather than sharing the reference's arrays: jit may
    # forward an unchanged input buffer into the train state, which is donated.
    if self.init_checkpoint:
      return policy_lib.load_init_params(self.init_checkpoint, abstract_params,
                                         config=self.model.config)
    return init_params_sharded(self.model, self._mesh, self._rules, self.reference_seed)

  @property
  def anchored(self) -> policy_lib.AnchoredPolicy:
    return policy_lib.AnchoredPolicy(self.model)

  def frozen(self):
    return self._ref

  # ---- reference log-probs ----------------------------------------------------
  @functools.cached_property
  def _ref_logprobs_fn(self):
    return jax.jit(lambda params, batch: pair_logprobs(self.model, params, batch))

  def _score_split(self, arrays) -> dict:
    chosen, rejected = [], []
    for batch in self.eval_batches(arrays):
      n = int(batch.pop("weights").sum())
      c, r = multihost.fetch(self._ref_logprobs_fn(
          self._ref, {k: jnp.asarray(v) for k, v in batch.items()}))
      chosen.append(c[:n])
      rejected.append(r[:n])
    return {"ref_chosen": np.concatenate(chosen).astype(np.float32),
            "ref_rejected": np.concatenate(rejected).astype(np.float32)}

  def train_arrays(self) -> dict:
    arrays = self.split_arrays("train")
    if self.precompute_reference:
      arrays = dict(arrays, **self._precomputed["train"])
    return arrays

  def prepare(self, params, batch, rng, aux=None, frozen=None):
    del params, rng, aux
    if "ref_chosen" in batch:
      return batch, {}
    if frozen is None:
      raise ValueError("DPO.prepare needs the reference params (frozen) or precomputed columns")
    rc, rr = pair_logprobs(self.anchored.reference_lm, jax.lax.stop_gradient(frozen), batch)
    sg = jax.lax.stop_gradient
    return dict(batch, ref_chosen=sg(rc), ref_rejected=sg(rr)), {}

  # ---- loss -----------------------------------------------------------------
  def loss(self, params, batch, rng, aux=None, frozen=None):
    del aux, frozen
    use_dropout = self.dropout and getattr(self.model.config, "dropout_rate", 0.0) > 0
    pc, pr = pair_logprobs(self.model, params, batch, dropout_rng=rng if use_dropout else None)
    losses = preference_losses(pc, pr, batch["ref_chosen"], batch["ref_rejected"],
                               beta=self.beta, loss_type=self.loss_type)
    rc, rr = implicit_rewards(pc, pr, batch["ref_chosen"], batch["ref_rejected"], beta=self.beta)
    return jnp.mean(losses), reward_metrics(rc, rr, pc, pr)

  # ---- eval: held-out preference accuracy of the implicit reward ------------------
  @functools.cached_property
  def _eval_fn(self):
    def fn(params, ref, batch):
      pc, pr = pair_logprobs(self.model, params, batch)
      if ref is not None:
        batch = dict(batch, **dict(zip(("ref_chosen", "ref_rejected"),
                                       pair_logprobs(self.model, ref, batch))))
      losses = preference_losses(pc, pr, batch["ref_chosen"], batch["ref_rejected"],
                                 beta=self.beta, loss_type=self.loss_type)
      rc, rr = implicit_rewards(pc, pr, batch["ref_chosen"], batch["ref_rejected"],
                                beta=self.beta)
      w = batch["weights"]
      return {"loss": jnp.sum(losses * w), "rewards/chosen": jnp.sum(rc * w),
              "rewards/rejected": jnp.sum(rr * w), "rewards/margins": jnp.sum((rc - rr) * w),
              "rewards/accuracies": jnp.sum((rc > rr) * w), "count": jnp.sum(w)}
    return jax.jit(fn)

  def evaluate(self, params, step, aux=None):
    del step, aux
    arrays = self.split_arrays(self.eval_split)
    if arrays is None:
      return {}, []
    if self.eval_split in self._precomputed:
      arrays = dict(arrays, **self._precomputed[self.eval_split])
    sums = {}
    for batch in self.eval_batches(arrays):
      out = multihost.fetch(self._eval_fn(params, self._ref,
                                          {k: jnp.asarray(v) for k, v in batch.items()}))
      for k, v in out.items():
        sums[k] = sums.get(k, 0.0) + float(v)
    n = max(sums.pop("count"), 1.0)
    return dict({k: v / n for k, v in sums.items()}, pairs=n), []
