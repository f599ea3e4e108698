"""The decode binary's methods: one configurable object per decoding method.

Each method declares its components (the run directories it decodes with,
besides the reference) and its rewards, checks its settings from model.json
files alone (`check`, before any params are read), builds its jitted runners
from the loaded components (`runners`) and turns one batch of their outputs
into rows (`rows`). The one batch loop of `realign_jax.decode` does the rest:
prompts, loading, host sharding, progress, the single atomic write.

  DeRa          logit or weight mixing of a reference and aligned model(s), a lambda sweep
  TokenwiseCD   pi(z | s) ~ p(z | s) exp(V([s, z]) / beta) over the top-k (or the vocabulary)
  BlockwiseCD   K candidate blocks of M tokens, the best by V kept
  TransferQ     Transfer Q*, direct or indirect (`indirect`)
  ARGS          log p(z | s) + w r(x, [s, z]) over the top-k

They are gin configurables (`decode.method = @TokenwiseCD()`), and `from_settings`
builds one from the binary's flat settings (`decode.method = 'cd_token'`,
`decode.cd_beta = ...`), so every config written for the flat form keeps working.
Rows of a batch come out in the file's order: prompt, then sample (then lambda).

A binary's helper, so on the binaries' floor (it reads the best-of-n theory of
evaluation/ for blockwise CD's KL bound).
"""

import dataclasses
import os
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from realign_jax.checkpoints import manager as ckpt_lib
from realign_jax.data import vocab as vocab_lib
from realign_jax.decoding import controlled, dera, sampler, transfer_q
from realign_jax.errors import UserError
from realign_jax.evaluation import best_of_n_theory
from realign_jax.models.api import LanguageModel
from realign_jax.rewards import learned
from realign_jax.rewards.base import Reward

MIXINGS = ("logits", "weights")
METHODS = ("dera", "cd_token", "cd_block", "tq_direct", "tq_indirect", "args")
TQ_METHODS = ("tq_direct", "tq_indirect")
REWARD_METHODS = TQ_METHODS + ("args",)
VALUE_METHODS = ("cd_token", "cd_block")


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
  outs: list  # one output per runner, rows (prompt, sample[, lambda]) of the padded batch
  seconds: float  # decoding wall time of the batch


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


def _same_reward(a: Reward, b: Reward) -> bool:
  if a is b:
    return True
  if isinstance(a, learned.LearnedReward) and isinstance(b, learned.LearnedReward):
    return os.path.realpath(a.model_dir) == os.path.realpath(b.model_dir)
  return (dataclasses.is_dataclass(a) and type(a) is type(b)
          and reward_label(a) == reward_label(b))


def _resolve_reward(method: str, obj: Optional[Reward], ckpt: Optional[str], what: str,
                    ctx: Context) -> Reward:
  """The reward given by gin (`obj`) or by a reward-model run directory (`ckpt`)."""
  if obj is not None and ckpt:
    raise UserError(f"give decode.{what} or decode.{what}_checkpoint, not both")
  if ckpt:
    obj = learned.LearnedReward(model_dir=ckpt, vocab_path=ctx.vocab_path,
                                input_length=ctx.input_length)
  if obj is None:
    raise UserError(f"method {method!r} needs decode.{what}_checkpoint (a reward-model run "
                    f"directory) or decode.{what} (e.g. @LengthReward())")
  if not isinstance(obj, Reward):
    raise UserError(f"decode.{what} must be a Reward (e.g. @LengthReward()), got "
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


# ---- the interface --------------------------------------------------------------------
class DecodeMethod:
  """One decoding method. Subclasses are dataclasses holding the method's settings."""

  name = ""

  def components(self) -> dict:
    """{name: (run directory, kind)} decoded with besides 'ref'; kind 'policy' or 'value'."""
    return {}

  def check(self, ctx: Context) -> None:
    """Every setting checked from model.json files alone (no params); one-line UserErrors."""

  def rewards(self) -> dict:
    """{name: Reward} set up and probed by the binary (after `check`)."""
    return {}

  def runners(self, comps: dict, rewards: dict, sampling: sampler.SamplingConfig,
              num_samples: int) -> list:
    """[Runner] from the loaded components ({name: dera.Component}) and rewards."""
    raise NotImplementedError

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


def _row_ids(seeds, n):
  return (seeds[:, None] * n + jnp.arange(n)[None]).reshape(-1)


def _host(out) -> dict:
  return jax.device_get(out)


# ---- DeRa -----------------------------------------------------------------------------
@dataclasses.dataclass
class DeRa(DecodeMethod):
  """DeRa (Liu et al. 2024): a lambda sweep mixing a reference and aligned model(s).

  `lambdas` (default [1.0]) with one `aligned_checkpoint` (or none: the
  reference alone), mixing 'logits' or 'weights'; or, for several aligned
  models (Appendix B), `aligned_checkpoints` [M] with `lambda_vectors` [K][M].
  """
  lambdas: Optional[Sequence[float]] = None
  aligned_checkpoint: Optional[str] = None
  mixing: str = "logits"
  aligned_checkpoints: Optional[Sequence[str]] = None
  lambda_vectors: Optional[Sequence[Sequence[float]]] = None

  name = "dera"

  def __post_init__(self):
    self._checked = None  # (aligned dirs, lambdas or vectors, multi) once checked

  def _settings(self):
    if self._checked is None:
      if self.mixing not in MIXINGS:
        raise UserError(f"mixing must be one of {MIXINGS}, got {self.mixing!r}")
      multi = self.aligned_checkpoints is not None
      if multi:
        dirs, lambdas = _check_multi(self.aligned_checkpoint, self.aligned_checkpoints,
                                     self.lambdas, self.lambda_vectors, self.mixing)
      else:
        if self.lambda_vectors is not None:
          raise UserError("lambda_vectors weighs several aligned models: give them as "
                          "decode.aligned_checkpoints (or use decode.lambdas with one "
                          "aligned_checkpoint)")
        lambdas = dera.check_lambdas((1.0,) if self.lambdas is None else self.lambdas)
        if len(set(lambdas)) != len(lambdas):
          raise UserError(f"the lambda list has duplicates: {lambdas}")
        dirs = [self.aligned_checkpoint] if self.aligned_checkpoint else []
      self._checked = (dirs, lambdas, multi)
    return self._checked

  def checked_lambdas(self) -> list:
    return self._settings()[1]

  def components(self) -> dict:
    return {f"aligned{i}": (d, "policy") for i, d in enumerate(self._settings()[0])}

  def check(self, ctx: Context) -> None:
    dirs, _, _ = self._settings()
    ref_cfg = ctx.ref_cfg
    for aligned_dir in dirs:  # NOTE: every aligned model, before any params are read
      al_cfg, _ = ckpt_lib.read_model_json(aligned_dir)
      if al_cfg.vocab_size != ref_cfg.vocab_size:
        raise UserError(f"reference and aligned models have different vocabulary sizes: "
                        f"{ref_cfg.vocab_size} ({ctx.ref_checkpoint}) vs {al_cfg.vocab_size} "
                        f"({aligned_dir})")
      check_same_tokens(ref_cfg, ctx.ref_checkpoint, al_cfg, aligned_dir)

  def runners(self, comps, rewards, sampling, num_samples):
    """Rows (b, j, k) of one runner, or one runner per lambda (weight mixing)."""
    dirs, lambdas, multi = self._settings()
    ref, n, cfg = comps["ref"], num_samples, sampling
    aligned = [comps[f"aligned{i}"] for i in range(len(dirs))]
    if self.mixing == "weights" and aligned:
      dera.check_same_architecture(aligned[0].params, ref.params)
    if multi:
      lam_vecs = jnp.asarray(lambdas, jnp.float32)  # [K, M]
      return [Runner(jax.jit(lambda x, s, r: dera.multi_sweep(ref, aligned, x, lam_vecs, r, cfg,
                                                              seeds=s, num_samples=n)))]
    if not aligned:
      def run(inputs, seeds, rng):
        return dera.sample_mixture([ref], jnp.ones((1,)), inputs, rng, cfg, num_samples=n,
                                   row_ids=_row_ids(seeds, n), reference_index=0)
      return [Runner(jax.jit(run))]
    al = aligned[0]
    if self.mixing == "logits":
      lam = jnp.asarray(lambdas, jnp.float32)
      return [Runner(jax.jit(lambda x, s, r: dera.dera_sweep(ref, al, x, lam, r, cfg, seeds=s,
                                                             num_samples=n)))]
    # Weight mixing: one model per lambda; the reference and aligned models ride
    # along with weight 0 so each token's log-probs and the KL come out of the same loop.
    out = []
    for lam in lambdas:
      mixed = dera.Component(ref.lm, dera.mix_weights(al.params, ref.params, lam))

      def run(inputs, seeds, rng, mixed=mixed):
        return dera.sample_mixture([mixed, ref, al], jnp.array([1.0, 0.0, 0.0]), inputs, rng,
                                   cfg, num_samples=n, row_ids=_row_ids(seeds, n),
                                   reference_index=1)
      out.append(Runner(jax.jit(run), key=lam))
    return out

  def rows(self, batch, prompts, vocab, n, seed, sampling):
    dirs, lambdas, multi = self._settings()
    has_aligned = bool(dirs)
    lam_list = lambdas if has_aligned else [None]
    per_lambda = len(batch.outs) > 1  # weight mixing: one output per lambda
    mixing = self.mixing
    rows = []
    for bi, p_idx in enumerate(batch.idx):
      for j in range(n):
        for lam_pos, lam in enumerate(lam_list):
          if per_lambda:
            out, r = batch.outs[lam_pos], bi * n + j
          else:
            out, r = batch.outs[0], (bi * n + j) * len(lam_list) + lam_pos
          length = int(out.lengths[r])
          comp = out.model_logprobs[:, r, :length]
          ref_lp = comp[0] if mixing == "logits" or not has_aligned else comp[1]
          if sampling.greedy:
            # NOTE: greedy decoding samples a point mass per step, not softmax
            # of the mixed logits: log q = 0 and KL(q || p_ref) = -log p_ref(y_t),
            # as every other method's greedy rows.
            lp = np.zeros_like(ref_lp)
            kl = float(-np.sum(ref_lp))
          else:
            lp = out.logprobs[r, :length]
            kl = float(np.sum(out.kl[r, :length]))
          if lam is None:
            lam_value = None
          else:
            lam_value = [float(x) for x in lam] if multi else float(lam)
          row = {
              "prompt": prompts[p_idx], "response": vocab_lib.decode(vocab, out.tokens[r].tolist()),
              "lam": lam_value, "seed": seed,
              "row_seed": int(p_idx * n + j), "prompt_index": int(p_idx), "sample": j,
              "mixing": mixing if has_aligned else "none",
              "tokens": out.tokens[r, :length].tolist(), "length": length,
              "logprobs": lp.tolist(), "ref_logprobs": ref_lp.tolist(),
              "kl": kl, "log_ratio": float(np.sum(lp - ref_lp)),
          }
          if multi:  # one list per aligned model, in the order of aligned_checkpoints
            row["aligned_model_logprobs"] = comp[1:].tolist()
          elif has_aligned:
            row["aligned_logprobs"] = (comp[1] if mixing == "logits" else comp[2]).tolist()
          rows.append(row)
    return rows

  def summary(self, rows):
    return {"lambdas": self.checked_lambdas(),
            "mean_kl": float(np.mean(np.array([r["kl"] for r in rows])))}


def _check_multi(aligned_checkpoint, aligned_checkpoints, lambdas, lambda_vectors,
                 mixing) -> tuple:
  """(aligned run directories, weight vectors) of multi-model DeRa, or a one-line UserError."""
  if aligned_checkpoint:
    raise UserError("give decode.aligned_checkpoint (one aligned model, with lambdas) or "
                    "decode.aligned_checkpoints (several, with lambda_vectors), not both")
  if (isinstance(aligned_checkpoints, (str, bytes)) or not aligned_checkpoints
      or not all(isinstance(d, str) and d for d in aligned_checkpoints)):
    raise UserError(f"aligned_checkpoints must be a non-empty list of run directories, got "
                    f"{aligned_checkpoints!r}")
  if lambdas is not None:
    raise UserError("with aligned_checkpoints the weights are decode.lambda_vectors (one "
                    "weight per aligned model per row), not decode.lambdas")
  if lambda_vectors is None:
    raise UserError(f"aligned_checkpoints needs decode.lambda_vectors: a list of weight lists, "
                    f"each with {len(aligned_checkpoints)} weights (one per aligned model)")
  if mixing != "logits":
    # NOTE: Appendix B mixes logits; weight mixing is defined here for one aligned model.
    raise UserError(f"several aligned models are mixed in logits only (mixing='logits'), got "
                    f"mixing={mixing!r}")
  return list(aligned_checkpoints), dera.check_lambda_vectors(lambda_vectors,
                                                              len(aligned_checkpoints))


def check_same_tokens(cfg_a, dir_a: str, cfg_b, dir_b: str) -> None:
  """Refuses two models that record different special ids (both named)."""
  if cfg_a.tokens != cfg_b.tokens:
    raise UserError(f"{dir_b} records special token ids {cfg_b.tokens.describe()} but {dir_a} "
                    f"records {cfg_a.tokens.describe()}; the models must share one tokenizer")


# ---- the per-token methods: CD, TQ*, ARGS -----------------------------------------------
class _SingleRunner(DecodeMethod):
  """A method with one jitted run(params, inputs, seeds, rng) -> dict of [B * n, ...] arrays.

  Params travel as arguments (not constants baked into the program). Rows (b, j).
  """

  def setting(self, ctx: Context) -> dict:
    raise NotImplementedError

  def decode_fn(self, comps, rewards, inputs, rng, cfg, n, row_ids):
    """(SampleOutput, nonfinite flags or None), traced inside the runner."""
    raise NotImplementedError

  def runners(self, comps, rewards, sampling, num_samples):
    lms = {k: c.lm for k, c in comps.items()}
    params = {k: c.params for k, c in comps.items()}
    params.update({k: r.params() for k, r in rewards.items()})
    n, cfg = num_samples, sampling

    def run(params, inputs, seeds, rng):
      comp = {k: dera.Component(lm, params[k]) for k, lm in lms.items()}
      rw = {k: transfer_q.token_reward(r, params[k]) for k, r in rewards.items()}
      out, nonfinite = self.decode_fn(comp, rw, inputs, rng, cfg, n, _row_ids(seeds, n))
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

  def check(self, ctx: Context) -> None:
    self._setting = self.setting(ctx)


def _value_kind(method: str, value_checkpoint: Optional[str], ctx: Context):
  if not value_checkpoint:
    raise UserError(f"method {method!r} needs decode.value_checkpoint (a value-model run "
                    f"directory, see configs/value/)")
  vcfg, vhead = ckpt_lib.read_model_json(value_checkpoint)
  value = dera.Component(LanguageModel(vcfg, vhead), None)
  kind = controlled.head_kind(value)
  controlled.check_same_vocab(dera.Component(LanguageModel(ctx.ref_cfg), None), value,
                              f"value model {value_checkpoint}")
  check_same_tokens(ctx.ref_cfg, ctx.ref_checkpoint, vcfg, value_checkpoint)
  return kind


def _temperature(sampling):
  return None if sampling.greedy else float(sampling.temperature)


@dataclasses.dataclass
class TokenwiseCD(_SingleRunner):
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
    kind = _value_kind(self.name, self.value_checkpoint, ctx)
    controlled.check_positive("cd_beta", self.beta)
    if self.top_k == 0 and kind != "q":
      # NOTE: a scalar head scores candidates on its cache forked once per
      # candidate: the whole vocabulary would fork it V ways every step.
      raise UserError(f"cd_top_k = 0 (the whole vocabulary) needs a Q-head value model "
                      f"(output_head 'lm'); {self.value_checkpoint} has a scalar head: set "
                      f"cd_top_k to the number of candidates")
    if self.top_k != 0:
      controlled.check_top_k(self.top_k, ctx.ref_cfg.vocab_size, "cd_top_k (candidates per step)")
    return {"beta": float(self.beta), "top_k": self.top_k,
            "value_head": "q" if kind == "q" else "scalar",
            "temperature": _temperature(ctx.sampling)}

  def decode_fn(self, comps, rewards, inputs, rng, cfg, n, row_ids):
    return controlled.tokenwise_cd(comps["ref"], comps["value"], inputs, rng, cfg,
                                   beta=self.beta, top_k=self.top_k, num_samples=n,
                                   row_ids=row_ids), None


@dataclasses.dataclass
class BlockwiseCD(_SingleRunner):
  """Blockwise CD: `num_candidates` (K) blocks of `block_length` (M) tokens, the best by V kept."""
  value_checkpoint: Optional[str] = None
  num_candidates: int = 4
  block_length: int = 4

  name = "cd_block"

  def components(self):
    return {"value": (self.value_checkpoint, "value")}

  def setting(self, ctx):
    kind = _value_kind(self.name, self.value_checkpoint, ctx)
    controlled.check_at_least_one("block_candidates (K, blocks per step)", self.num_candidates)
    controlled.check_at_least_one("block_length (M, tokens per block)", self.block_length)
    return {"num_candidates": self.num_candidates, "block_length": self.block_length,
            "value_head": "q" if kind == "q" else "scalar",
            "temperature": float(ctx.sampling.temperature)}

  def decode_fn(self, comps, rewards, inputs, rng, cfg, n, row_ids):
    return controlled.blockwise_cd(comps["ref"], comps["value"], inputs, rng, cfg,
                                   num_blocks=self.num_candidates, block_len=self.block_length,
                                   num_samples=n, row_ids=row_ids), None

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


@dataclasses.dataclass
class TransferQ(_SingleRunner):
  """Transfer Q*: the baseline rolled out from the reference's top-k; direct or `indirect`.

  The target reward is `reward` or `reward_checkpoint`; indirect transfer also
  reads the baseline's reward (`baseline_reward` or `baseline_reward_checkpoint`),
  a different one. `tq.mode` is set by `indirect`.
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
    self._target = _resolve_reward(method, self.reward, self.reward_checkpoint, "reward", ctx)
    self._base_r = None
    if self.indirect:
      self._base_r = _resolve_reward(method, self.baseline_reward,
                                     self.baseline_reward_checkpoint, "baseline_reward", ctx)
      if _same_reward(self._target, self._base_r):
        raise UserError(f"indirect Transfer Q* needs two different rewards, but reward and "
                        f"baseline_reward are the same ({reward_label(self._target)}); use "
                        f"tq_direct when the baseline is aligned to the target reward")
    elif self.baseline_reward is not None or self.baseline_reward_checkpoint:
      raise UserError(f"baseline_reward is read by method 'tq_indirect' only, not {method!r}")
    if not self.baseline_checkpoint:
      raise UserError(f"method {method!r} needs decode.baseline_checkpoint (the aligned "
                      f"baseline policy's run directory)")
    bcfg, _ = ckpt_lib.read_model_json(self.baseline_checkpoint)
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
               "reward": reward_label(self._target), "temperature": _temperature(ctx.sampling)}
    if self.indirect:
      setting.update(weighting=tq.weighting, alpha_traj=float(tq.alpha_traj),
                     baseline_reward=reward_label(self._base_r))
    return setting

  def decode_fn(self, comps, rewards, inputs, rng, cfg, n, row_ids):
    return transfer_q.transfer_q(comps["ref"], comps["baseline"], inputs, rng, cfg, self._tq,
                                 rewards["reward"], baseline_reward=rewards.get("baseline_reward"),
                                 num_samples=n, row_ids=row_ids)


@dataclasses.dataclass
class ARGS(_SingleRunner):
  """ARGS: log p(z | s) + `weight` r(x, [s, z]) over the top-k of p."""
  reward: Optional[Reward] = None
  reward_checkpoint: Optional[str] = None
  top_k: int = 10
  weight: float = 1.0

  name = "args"

  def rewards(self):
    return {"reward": self._target}

  def setting(self, ctx):
    self._target = _resolve_reward(self.name, self.reward, self.reward_checkpoint, "reward", ctx)
    transfer_q.validate_args(dera.Component(LanguageModel(ctx.ref_cfg), None), self.top_k,
                             self.weight)
    return {"top_k": self.top_k, "weight": float(self.weight),
            "reward": reward_label(self._target), "temperature": _temperature(ctx.sampling)}

  def decode_fn(self, comps, rewards, inputs, rng, cfg, n, row_ids):
    return transfer_q.args_decode(comps["ref"], inputs, rng, cfg, rewards["reward"],
                                  top_k=self.top_k, weight=self.weight, num_samples=n,
                                  row_ids=row_ids)


CONFIGURABLES = (DeRa, TokenwiseCD, BlockwiseCD, TransferQ, ARGS)


def from_settings(method: str, *, lambdas=None, aligned_checkpoint=None, mixing="logits",
                  aligned_checkpoints=None, lambda_vectors=None, value_checkpoint=None,
                  baseline_checkpoint=None, reward=None, reward_checkpoint=None,
                  baseline_reward=None, baseline_reward_checkpoint=None, cd_beta=1.0,
                  cd_top_k=10, block_candidates=4, block_length=4,
                  tq=transfer_q.TQConfig(), args_top_k=10, args_weight=1.0) -> DecodeMethod:
  """The method object named `method` from the binary's flat settings (`decode.cd_beta`, ...).

  A setting that another method reads is refused by name when it is set.
  """
  if method not in METHODS:
    raise UserError(f"decode method must be one of {METHODS}, got {method!r}")
  if method == "dera":
    return DeRa(lambdas=lambdas, aligned_checkpoint=aligned_checkpoint, mixing=mixing,
                aligned_checkpoints=aligned_checkpoints, lambda_vectors=lambda_vectors)
  if aligned_checkpoints is not None or lambda_vectors is not None:
    raise UserError(f"aligned_checkpoints and lambda_vectors are read by method 'dera' only, "
                    f"not {method!r}")
  if aligned_checkpoint:
    raise UserError(f"aligned_checkpoint is read by method 'dera' only, not {method!r}; "
                    f"unset it (for TQ* the aligned baseline is baseline_checkpoint)")
  if method == "cd_token":
    return TokenwiseCD(value_checkpoint=value_checkpoint, beta=cd_beta, top_k=cd_top_k)
  if method == "cd_block":
    return BlockwiseCD(value_checkpoint=value_checkpoint, num_candidates=block_candidates,
                       block_length=block_length)
  if method in TQ_METHODS:
    return TransferQ(baseline_checkpoint=baseline_checkpoint, reward=reward,
                     reward_checkpoint=reward_checkpoint, baseline_reward=baseline_reward,
                     baseline_reward_checkpoint=baseline_reward_checkpoint, tq=tq,
                     indirect=method == "tq_indirect")
  if baseline_reward is not None or baseline_reward_checkpoint:
    raise UserError(f"baseline_reward is read by method 'tq_indirect' only, not {method!r}")
  return ARGS(reward=reward, reward_checkpoint=reward_checkpoint, top_k=args_top_k,
              weight=args_weight)
