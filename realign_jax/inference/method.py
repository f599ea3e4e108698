"""What a decoding method is: one configurable object, its runners and its rows.

Each method declares its components (the run directories it decodes with,
besides the reference) and its rewards, checks its settings from model.json
files alone (`check`, before any params are read), builds its jitted runners
from the loaded components (`runners`) and turns one batch of their outputs
into rows (`rows`). The one batch loop (`loop.decode_batches`) does the rest:
host split, progress, gathering; `run.run` adds prompts, loading and probing.
Rows of a batch come out in the file's order: prompt, then sample (then lambda).
"""

import dataclasses
import os
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from realign_jax.data import vocab as vocab_lib
from realign_jax.decoding import dera, sampler, transfer_q
from realign_jax.plumbing.errors import UserError
from realign_jax.rewards import learned
from realign_jax.rewards.base import Reward


class Runner(NamedTuple):
  """One jitted program: `fn(*args, inputs, seeds, rng)`; `key` tells its outputs apart."""
  fn: Callable
  args: tuple = ()
  key: Any = None


class Context(NamedTuple):
  """What every method's check reads besides its own settings."""
  ref_checkpoint: str
  ref_cfg: Any  # the reference's ModelConfig
  vocab_path: Optional[str]
  input_length: int
  sampling: sampler.SamplingConfig


class Batch(NamedTuple):
  """One decoded batch: its prompts' indices and every runner's (host) outputs."""
  idx: np.ndarray  # [b] prompt indices, b <= batch_size
  outs: list  # `DecodeMethod.device_outputs` of the runners, rows (prompt, sample[, lambda])
  seconds: float  # decoding wall time of the batch


class DecodeMethod:
  """One decoding method. Subclasses are dataclasses holding the method's settings."""

  name = ""

  def components(self) -> dict:
    """{name: (run directory, kind)} decoded with besides 'ref'; kind 'policy' or 'value'."""
    return {}

  def check(self, ctx: Context) -> None:
    """Every setting checked from model.json files alone (no params); one-line UserErrors."""

  def rewards(self) -> dict:
    """{name: Reward} set up and probed by `run.run` (after `check`)."""
    return {}

  def runners(self, comps: dict, rewards: dict, sampling: sampler.SamplingConfig,
              num_samples: int) -> list:
    """[Runner] from the loaded components ({name: dera.Component}) and rewards."""
    raise NotImplementedError

  def device_outputs(self, outs: list, inputs) -> list:
    """The runners' outputs of one batch (on its devices) -> what leaves the devices.

    `inputs` [B, input_length] are the batch's prompt ids. Runs in the process
    that decoded the batch, outside the loop's mesh context; the default is
    the outputs themselves.
    """
    del inputs
    return outs

  def check_batch(self, batch: Batch, prompts: Sequence[str], n: int) -> None:
    """Refuses a batch's outputs before any row is made (e.g. a non-finite reward)."""

  def rows(self, batch: Batch, prompts: Sequence[str], vocab, n: int, seed: int,
           sampling: sampler.SamplingConfig) -> list:
    raise NotImplementedError

  def summary(self, rows: Sequence[dict]) -> dict:
    raise NotImplementedError

  def describe_batch(self, batch: Batch) -> dict:
    """Per-batch numbers the loop adds up into the summary's timing (besides tokens)."""
    return {}


def row_ids(seeds, n):
  """[B] prompt indices -> [B * n] row seeds: prompt b, sample j draws with seed b * n + j."""
  return (seeds[:, None] * n + jnp.arange(n)[None]).reshape(-1)


def check_same_tokens(cfg_a, dir_a: str, cfg_b, dir_b: str) -> None:
  """Refuses two models that record different special ids (both named)."""
  if cfg_a.tokens != cfg_b.tokens:
    raise UserError(f"{dir_b} records special token ids {cfg_b.tokens.describe()} but {dir_a} "
                    f"records {cfg_a.tokens.describe()}; the models must share one tokenizer")


# ---- rewards --------------------------------------------------------------------------
def reward_label(r: Reward) -> str:
  """A short, stable description of a reward (rows' setting; distinctness check)."""
  if isinstance(r, learned.LearnedReward):
    return f"learned:{os.path.normpath(r.model_dir)}"
  if dataclasses.is_dataclass(r):
    fields = ", ".join(f"{f.name}={getattr(r, f.name)!r}" for f in dataclasses.fields(r)
                       if f.name not in ("name", "vocab_path", "batch_size"))
    return f"{getattr(r, 'name', type(r).__name__)}({fields})"
  return getattr(r, "name", type(r).__name__)


def same_reward(a: Reward, b: Reward) -> bool:
  if a is b:
    return True
  if isinstance(a, learned.LearnedReward) and isinstance(b, learned.LearnedReward):
    return os.path.realpath(a.model_dir) == os.path.realpath(b.model_dir)
  return (dataclasses.is_dataclass(a) and type(a) is type(b)
          and reward_label(a) == reward_label(b))


def resolve_reward(method: DecodeMethod, obj: Optional[Reward], ckpt: Optional[str], what: str,
                   ctx: Context) -> Reward:
  """The reward given as an object (`obj`) or by a reward-model run directory (`ckpt`)."""
  owner = type(method).__name__
  if obj is not None and ckpt:
    raise UserError(f"give {owner}.{what} or {owner}.{what}_checkpoint, not both")
  if ckpt:
    obj = learned.LearnedReward(model_dir=ckpt, vocab_path=ctx.vocab_path,
                                input_length=ctx.input_length)
  if obj is None:
    raise UserError(f"method {method.name!r} needs {owner}.{what}_checkpoint (a reward-model "
                    f"run directory) or {owner}.{what} (e.g. @LengthReward())")
  if not isinstance(obj, Reward):
    raise UserError(f"{owner}.{what} must be a Reward (e.g. @LengthReward()), got "
                    f"{type(obj).__name__}")
  tokens = ctx.ref_cfg.tokens
  if obj.special_tokens() != tokens:
    raise UserError(f"the {what} {reward_label(obj)} reads special token ids "
                    f"{obj.special_tokens().describe()} but the policy records "
                    f"{tokens.describe()}; give the reward the policy's vocabulary (vocab_path)")
  lm = getattr(obj, "lm", None)
  if lm is not None and lm.vocab_size != ctx.ref_cfg.vocab_size:
    raise UserError(f"the {what} model {reward_label(obj)} has vocabulary size "
                    f"{lm.vocab_size} but the policy has {ctx.ref_cfg.vocab_size}; they must "
                    f"share one vocabulary")
  return obj


# ---- the per-token methods: CD, TQ*, ARGS -----------------------------------------------
class SingleRunner(DecodeMethod):
  """A method with one jitted run(params, inputs, seeds, rng) -> dict of [B * n, ...] arrays.

  Params travel as arguments (not constants baked into the program). Rows (b, j).
  """

  def setting(self, ctx: Context) -> dict:
    raise NotImplementedError

  def decode_fn(self, comps, rewards, inputs, rng, cfg, n, row_ids_):
    """(SampleOutput, nonfinite flags or None), traced inside the runner."""
    raise NotImplementedError

  def check(self, ctx: Context) -> None:
    self._setting = self.setting(ctx)

  def runners(self, comps, rewards, sampling, num_samples):
    lms = {k: c.lm for k, c in comps.items()}
    params = {k: c.params for k, c in comps.items()}
    params.update({k: r.params() for k, r in rewards.items()})
    n, cfg = num_samples, sampling

    def run(params, inputs, seeds, rng):
      comp = {k: dera.Component(lm, params[k]) for k, lm in lms.items()}
      rw = {k: transfer_q.token_reward(r, params[k]) for k, r in rewards.items()}
      out, nonfinite = self.decode_fn(comp, rw, inputs, rng, cfg, n, row_ids(seeds, n))
      return {"tokens": out.tokens, "logprobs": out.logprobs, "lengths": out.lengths,
              "ref_logprobs": out.model_logprobs[0], "kl": out.kl, "nonfinite": nonfinite,
              "proposal_logprobs": out.model_logprobs[1] if self.name == "cd_block" else None}
    return [Runner(jax.jit(run), (params,))]

  def check_batch(self, batch, prompts, n):
    out = batch.outs[0]
    if out["nonfinite"] is not None:
      bad = np.asarray(out["nonfinite"]).reshape(-1, n)[:len(batch.idx)]
      if bad.any():
        p = int(batch.idx[np.argmax(bad.any(axis=1))])
        raise UserError(f"a reward returned a non-finite score while decoding prompt {p} "
                        f"({prompts[p][:60]!r}); nothing was written")

  def rows(self, batch, prompts, vocab, n, seed, sampling):
    out, rows = batch.outs[0], []
    for bi, p_idx in enumerate(batch.idx):
      for j in range(n):
        r = bi * n + j
        length = int(out["lengths"][r])
        ref_lp = np.asarray(out["ref_logprobs"][r, :length])
        row = {"prompt": prompts[p_idx],
               "response": vocab_lib.decode(vocab, out["tokens"][r].tolist()),
               "method": self.name, "setting": self._setting, "seed": seed,
               "row_seed": int(p_idx * n + j), "prompt_index": int(p_idx), "sample": j,
               "tokens": out["tokens"][r, :length].tolist(), "length": length}
        row.update(self.kl_fields(batch, out, r, length, ref_lp, sampling))
        rows.append(row)
    return rows

  def kl_fields(self, batch, out, r, length, ref_lp, sampling) -> dict:
    if sampling.greedy:  # a point mass per step: log q = 0, KL = -log p_ref(y_t)
      lp = np.zeros_like(ref_lp)
      kl = float(-np.sum(ref_lp))
    else:
      lp = np.asarray(out["logprobs"][r, :length])
      kl = float(np.sum(out["kl"][r, :length]))
    return dict(logprobs=lp.tolist(), ref_logprobs=ref_lp.tolist(), kl=kl,
                log_ratio=float(np.sum(lp - ref_lp)), kl_kind="exact")

  def summary(self, rows):
    return {"method": self.name, "setting": self._setting,
            "mean_kl": float(np.mean([r["kl"] for r in rows])), "kl_kind": "exact"}


def temperature(sampling) -> Optional[float]:
  """The rows' temperature setting: None for greedy decoding."""
  return None if sampling.greedy else float(sampling.temperature)
