"""Reward-guided decoding: Transfer Q* (TransferQ, direct or indirect) and ARGS.

  decode.method = @TransferQ()
  TransferQ.baseline_checkpoint = 'runs/ppo'
  TransferQ.reward = @LengthReward()
  TransferQ.tq = @TQConfig()

The rewards are a `Reward` object (`reward = @LengthReward()`) or a
reward-model run directory (`reward_checkpoint`), never both.
"""

import dataclasses
from typing import Optional

from realign_jax.checkpoints import run_dir
from realign_jax.decoding import dera, transfer_q
from realign_jax.plumbing.errors import UserError
from realign_jax.inference.method import SingleRunner, check_same_tokens, resolve_reward
from realign_jax.inference.method import reward_label, same_reward, temperature
from realign_jax.models.api import LanguageModel
from realign_jax.rewards.base import Reward


@dataclasses.dataclass
class TransferQ(SingleRunner):
  """Transfer Q*: the baseline rolled out from the reference's top-k; direct or `indirect`.

  The target reward is `reward` or `reward_checkpoint`; indirect transfer also
  reads the baseline's reward (`baseline_reward` or `baseline_reward_checkpoint`),
  a different one. `tq.mode` is set by `indirect`; `tq.alpha_convention`
  'paper' (the default) samples p exp(Q / alpha), alpha the KL weight,
  'authors' scores log p + alpha Q as the authors' code.
  """
  baseline_checkpoint: Optional[str] = None
  reward: Optional[Reward] = None
  reward_checkpoint: Optional[str] = None
  baseline_reward: Optional[Reward] = None
  baseline_reward_checkpoint: Optional[str] = None
  tq: transfer_q.TQConfig = transfer_q.TQConfig()
  indirect: bool = False

  @property
  def name(self):
    return "tq_indirect" if self.indirect else "tq_direct"

  def components(self):
    return {"baseline": (self.baseline_checkpoint, "policy")}

  def rewards(self):
    out = {"reward": self._target}
    if self._base_r is not None:
      out["baseline_reward"] = self._base_r
    return out

  def setting(self, ctx):
    method = self.name
    self._target = resolve_reward(self, self.reward, self.reward_checkpoint, "reward", ctx)
    self._base_r = None
    if self.indirect:
      self._base_r = resolve_reward(self, self.baseline_reward, self.baseline_reward_checkpoint,
                                    "baseline_reward", ctx)
      if same_reward(self._target, self._base_r):
        raise UserError(f"indirect Transfer Q* needs two different rewards, but reward and "
                        f"baseline_reward are the same ({reward_label(self._target)}); use "
                        f"TransferQ.indirect = False when the baseline is aligned to the target "
                        f"reward")
    elif self.baseline_reward is not None or self.baseline_reward_checkpoint:
      raise UserError(f"baseline_reward is read by indirect Transfer Q* only "
                      f"(TransferQ.indirect = True), not {method!r}")
    if not self.baseline_checkpoint:
      raise UserError(f"method {method!r} needs TransferQ.baseline_checkpoint (the aligned "
                      f"baseline policy's run directory)")
    bcfg, _ = run_dir.read_model_json(self.baseline_checkpoint)
    # NOTE: the method, not TQConfig.mode, decides direct or indirect transfer.
    self._tq = dataclasses.replace(self.tq, mode="indirect" if self.indirect else "direct")
    transfer_q.validate_tq(dera.Component(LanguageModel(ctx.ref_cfg), None),
                           dera.Component(LanguageModel(bcfg), None), self._tq,
                           baseline_reward=None if self._base_r is None else (lambda *a: None))
    check_same_tokens(ctx.ref_cfg, ctx.ref_checkpoint, bcfg, self.baseline_checkpoint)
    # NOTE: alpha means opposite things under the two conventions; the rows say which.
    tq = self._tq
    setting = {"top_k": tq.top_k, "horizon": tq.horizon, "alpha": float(tq.alpha),
               "alpha_convention": tq.alpha_convention, "num_rollouts": tq.num_rollouts,
               "reward": reward_label(self._target), "temperature": temperature(ctx.sampling)}
    if self.indirect:
      setting.update(weighting=tq.weighting, alpha_traj=float(tq.alpha_traj),
                     baseline_reward=reward_label(self._base_r))
    return setting

  def decode_fn(self, comps, rewards, inputs, rng, cfg, n, row_ids_):
    return transfer_q.transfer_q(comps["ref"], comps["baseline"], inputs, rng, cfg, self._tq,
                                 rewards["reward"], baseline_reward=rewards.get("baseline_reward"),
                                 num_samples=n, row_ids=row_ids_)


@dataclasses.dataclass
class ARGS(SingleRunner):
  """ARGS: log p(z | s) + `weight` r(x, [s, z]) over the top-k of p."""
  reward: Optional[Reward] = None
  reward_checkpoint: Optional[str] = None
  top_k: int = 10
  weight: float = 1.0

  name = "args"

  def rewards(self):
    return {"reward": self._target}

  def setting(self, ctx):
    self._target = resolve_reward(self, self.reward, self.reward_checkpoint, "reward", ctx)
    transfer_q.validate_args(dera.Component(LanguageModel(ctx.ref_cfg), None), self.top_k,
                             self.weight)
    return {"top_k": self.top_k, "weight": float(self.weight),
            "reward": reward_label(self._target), "temperature": temperature(ctx.sampling)}

  def decode_fn(self, comps, rewards, inputs, rng, cfg, n, row_ids_):
    return transfer_q.args_decode(comps["ref"], inputs, rng, cfg, rewards["reward"],
                                  top_k=self.top_k, weight=self.weight, num_samples=n,
                                  row_ids=row_ids_)
