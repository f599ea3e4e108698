"""The anchored policy: a trainable policy and its frozen reference, one module.

PPO, vanilla policy gradient, DPO/IPO and the KL metrics all read the same
pair (gemma's `AnchoredPolicy` pattern). The policy is a `LanguageModel`
(possibly with a value head, output_head "lm+scalar"); the reference is the
same architecture with the plain "lm" head, its params passed in as frozen
arguments and read under `stop_gradient`.

Both usually start from one SFT run directory (INIT_CHECKPOINT):
`load_init_params` loads it into the policy's params (a value head missing
from the checkpoint starts fresh) and into the reference's.

Shapes: `inputs` [B, Li] prompts, `targets` [B, T] responses (right-padded
with the model's pad id, `config.tokens.pad_id`; a response need not end in
EOS when it was cut at the length limit). Only pad is special here: an EOS id
inside a response is an ordinary token, scored like any other.
"""

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp

from realign_jax.checkpoints import manager as ckpt_lib
from realign_jax.checkpoints import run_dir
from realign_jax.decoding import sampler
from realign_jax.plumbing.errors import UserError
from realign_jax.models.api import LanguageModel
from realign_jax.models.config import ModelConfig

# NOTE: the value head's params live under this top-level key (models/heads.py's
# ScalarHead, named by both families), so "policy minus value head" is exactly
# the reference's param tree.
VALUE_HEAD = "scalar_head"
# Config fields that do not change the parameter tree or the function computed
# at inference (dropout is off in RL and DPO log-probs).
_NON_ARCH_FIELDS = ("dropout_rate", "dtype")


# ---- log-probs ----------------------------------------------------------------
def logprobs_from_logits(logits, targets, pad_id: int = sampler.PAD_ID):
  """log p(targets[t]) per position: [B, T, V], [B, T] -> [B, T] float32 (0 at pad targets).

  `pad_id`: the model's (`config.tokens.pad_id`; default T5's 0).

  NOTE: p is over the vocabulary without pad, the distribution THE sampler
  draws from (`sampler.mask_pad`), so a sampled response's teacher-forced
  log-probs are exactly the ones the sampler recorded (PPO's first ratio is 1).
  """
  logp = jax.nn.log_softmax(sampler.mask_pad(logits, pad_id), axis=-1)
  lp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  return jnp.where(targets == pad_id, 0.0, lp)


def length_mask(lengths, t: int):
  """[B] lengths -> [B, T] float32, 1 on the first lengths[b] positions."""
  return (jnp.arange(t)[None, :] < lengths[:, None]).astype(jnp.float32)


def target_mask(targets, pad_id: int = sampler.PAD_ID):
  """[B, T] -> [B, T] float32, 1 on real (non-pad) target tokens."""
  return (targets != pad_id).astype(jnp.float32)


def token_logprobs(lm: LanguageModel, params, inputs, targets, *, mask=None,
                   dropout_rng=None):
  """Per-token log-probs of the responses: [B, T] float32, 0 where mask is 0.

  `mask` [B, T] defaults to the non-pad targets.
  """
  out = lm.forward(params, inputs, targets, dropout_rng=dropout_rng)
  pad = sampler.tokens_of(lm).pad_id
  mask = target_mask(targets, pad) if mask is None else mask
  return logprobs_from_logits(out["logits"], targets, pad) * mask


def sequence_logprob(lm: LanguageModel, params, inputs, targets, *, mask=None,
                     dropout_rng=None):
  """log p(y | x) summed over the response tokens: [B]."""
  return jnp.sum(token_logprobs(lm, params, inputs, targets, mask=mask,
                                dropout_rng=dropout_rng), axis=-1)


def full_kl_and_entropy(logits, ref_logits, pad_id: int = sampler.PAD_ID):
  """Exact per-position KL(p || p_ref) and entropy H(p) over the vocabulary without pad.

  [B, T, V], [B, T, V] -> ([B, T], [B, T]) float32.
  """
  logp = jax.nn.log_softmax(sampler.mask_pad(logits, pad_id), axis=-1)
  logr = jax.nn.log_softmax(sampler.mask_pad(ref_logits, pad_id), axis=-1)
  p = jnp.exp(logp)
  # NOTE: p log p is 0 where p is 0 (pad, or an underflow). The logs are zeroed
  # there BEFORE the product: where(p > 0, p * logp, 0) would be right but its
  # gradient is nan (0 * -inf), which PPO's entropy bonus differentiates.
  live = p > 0
  plogp = p * jnp.where(live, logp, 0.0)
  plogr = p * jnp.where(live, logr, 0.0)
  return jnp.sum(plogp - plogr, axis=-1), -jnp.sum(plogp, axis=-1)


# ---- the pair -----------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AnchoredPolicy:
  """A policy `lm` and its frozen reference (the same architecture, "lm" head)."""

  lm: LanguageModel

  @property
  def reference_lm(self) -> LanguageModel:
    return LanguageModel(self.lm.config, "lm")

  @property
  def pad_id(self) -> int:
    """The pair's pad id (one config: the same for both)."""
    return sampler.tokens_of(self.lm).pad_id

  def policy_outputs(self, params, inputs, targets, *, dropout_rng=None) -> dict:
    """The policy's teacher-forced outputs ("logits" [B, T, V], maybe "values" [B, T])."""
    return self.lm.forward(params, inputs, targets, dropout_rng=dropout_rng)

  def reference_logits(self, ref_params, inputs, targets):
    """The reference's logits [B, T, V]; no gradient ever flows into it."""
    ref_params = jax.lax.stop_gradient(ref_params)
    return jax.lax.stop_gradient(
        self.reference_lm.forward(ref_params, inputs, targets)["logits"])

  def logprobs(self, params, ref_params, inputs, targets, *, mask=None):
    """(policy, reference) per-token log-probs, each [B, T] (0 where mask is 0)."""
    pad = self.pad_id
    mask = target_mask(targets, pad) if mask is None else mask
    pol = logprobs_from_logits(self.policy_outputs(params, inputs, targets)["logits"], targets,
                               pad)
    ref = logprobs_from_logits(self.reference_logits(ref_params, inputs, targets), targets, pad)
    return pol * mask, ref * mask


def strip_value_head(params):
  """The policy's params without the value head (= the reference's tree)."""
  return {k: v for k, v in params.items() if k != VALUE_HEAD}


# ---- INIT_CHECKPOINT ----------------------------------------------------------
def _arch(config: ModelConfig) -> dict:
  d = dataclasses.asdict(config)
  for k in _NON_ARCH_FIELDS:
    d.pop(k, None)
  return d


def check_init_checkpoint(init_checkpoint: str, config: Optional[ModelConfig] = None,
                          what: str = "INIT_CHECKPOINT") -> tuple:
  """(config, output_head) of a run directory, checked against `config`.

  Raises UserError if the directory or its model.json is missing, or if it
  holds another architecture than `config`.
  """
  found, head = run_dir.read_run_model(init_checkpoint, what)
  if config is not None:
    if found.family != config.family:
      raise UserError(f"{what} {init_checkpoint} holds a {found.family} model but this run's "
                      f"policy is a {config.family} model")
    a, b = _arch(found), _arch(config)
    diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if diff:
      k = diff[0]
      raise UserError(f"{what} {init_checkpoint} holds another architecture: {k}="
                      f"{a.get(k)!r} there, {b.get(k)!r} in this run's model config")
  return found, head


def _replicated_like(abstract_params, shape_dtype):
  """A ShapeDtypeStruct with the sharding of any leaf's mesh, replicated (or none)."""
  leaf = jax.tree_util.tree_leaves(abstract_params)[0]
  sh = getattr(leaf, "sharding", None)
  if sh is not None and hasattr(sh, "mesh"):
    sh = jax.sharding.NamedSharding(sh.mesh, jax.sharding.PartitionSpec())
  return jax.ShapeDtypeStruct(shape_dtype.shape, shape_dtype.dtype, sharding=sh)


def load_init_params(init_checkpoint: str, abstract_params: Any, *,
                     config: Optional[ModelConfig] = None, fresh_value_head: Any = None,
                     what: str = "INIT_CHECKPOINT") -> Any:
  """Loads a run directory's latest params into `abstract_params`' tree and shardings.

  Args:
    init_checkpoint: a run directory (e.g. of SFT).
    abstract_params: ShapeDtypeStructs (with shardings) of the params wanted:
      a policy with or without a value head, or a reference.
    config: the model config the params are for; checked against the
      directory's model.json (None: no check beyond parameter shapes).
    fresh_value_head: params of a fresh value head, used when
      `abstract_params` has one and the checkpoint does not (default zeros,
      which is what ScalarHead's initialisers give).
    what: the name used in error messages.

  Returns:
    The params. A value head present in the checkpoint but not wanted is dropped.
  """
  found_config, found_head = check_init_checkpoint(init_checkpoint, config, what)
  want_head = VALUE_HEAD in abstract_params
  has_head = "scalar" in found_head
  if "lm" not in found_head:
    raise UserError(f"{what} {init_checkpoint} holds a model with output_head {found_head!r}, "
                    "not a language model")
  target = strip_value_head(abstract_params)
  if has_head:
    ckpt_abstract, _ = LanguageModel(found_config, found_head).abstract_init()
    target = dict(target, **{VALUE_HEAD: jax.tree_util.tree_map(
        lambda s: _replicated_like(abstract_params, s), ckpt_abstract[VALUE_HEAD])})
  params = ckpt_lib.load_params(init_checkpoint, target)
  if not want_head:
    return strip_value_head(params)
  if has_head:
    return params
  if fresh_value_head is None:
    fresh_value_head = jax.tree_util.tree_map(
        lambda s: jax.device_put(jnp.zeros(s.shape, s.dtype), s.sharding)
        if getattr(s, "sharding", None) is not None else jnp.zeros(s.shape, s.dtype),
        abstract_params[VALUE_HEAD])
  return dict(params, **{VALUE_HEAD: fresh_value_head})
