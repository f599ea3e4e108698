r"""The reward-vs-KL frontier of every alignment method of the project, on one task.

  python -m realign_jax.experiments.frontier \
      --gin_file=configs/experiments/frontier_tiny.gin --gin.MODEL_DIR="'D'"

Training stages (each in its own subdirectory of MODEL_DIR, cached: a rerun resumes):
  sft              SFT on the task: the reference p
  ppo_beta{B}      PPO from SFT with the task reward at every beta of `betas`
  value_fudge      CD-FUDGE value model (scalar head), trunk from SFT
  value_cdq        CD-Q Q-head, trunk from SFT, target network copied periodically
Decoding stages, all through the decode binary's function (`realign_jax.decode.decode`)
on the same prompts, with the same seed and sampling settings:
  best_of_n        max(n) samples of p per prompt; best-of-n for every n is the best
                   of the first n (nested subsets of one draw)
  ppo_beta{B}_eval each PPO policy
  dera_sweep       DeRa between p and the PPO model at `aligned_beta`, every lambda
  cd_token_fudge_k{k}_beta{b}  token-wise CD over the top-k of p with the FUDGE value
  cd_token_q_k{k}_beta{b}      token-wise CD with the Q-head, over the top-k of p or
                   (k = 0) the whole vocabulary
  cd_block_K{K}    blockwise CD (K blocks of M tokens, the best by the FUDGE value)
  tq_direct_alpha{a}      Transfer Q*, baseline = the PPO model at `aligned_beta`;
                   alpha is the paper's KL weight (`tq_alpha_convention` 'paper':
                   p exp(Q / alpha), larger = closer to p); with 'authors' (log p +
                   alpha Q, the authors' code) the stages are tq_direct_authors_alpha{a}
  args_w{w}        ARGS with the task reward (w = 0: sampling p truncated to its top-k,
                   the KL that the truncation alone costs)
then MODEL_DIR/results.json (one entry per method and setting: method, setting,
reward, kl, kl_kind, length, ...), report.md and frontier.png. `length` is the
mean response length in tokens WITHOUT EOS (as the length reward of eq. 10 and
the length study count it; the decode rows' `length` includes EOS).

KL to p, per entry (`kl_kind`):
  exact          the method defines a per-token distribution q: the mean over
                 responses of sum_t KL(q(. | s_t) || p(. | s_t)) (full vocabulary);
  bon_estimator  best-of-n and blockwise CD have none: the mean of the best-of-n
                 estimator KL_hat(eps, n), eps = p(y) of the kept response (per
                 block for blockwise CD); `kl_bound` carries log n - (n - 1) / n
                 (per block, summed) and, for best-of-n, `kl_levels` the exact
                 best-of-n KL of each prompt's empirical reward distribution
                 (exact for a reward with ties, given the levels' probabilities).
Rewards are the task reward scored on the sampled tokens exactly as in training.
"""

from realign_jax import cli

cli.precheck(__name__)  # NOTE: before the heavy imports (see cli.py)

import dataclasses
import math
import os
import time
from typing import Optional, Sequence

import numpy as np

from realign_jax import gin_utils
from realign_jax.errors import UserError
from realign_jax.evaluation import optimum as opt
from realign_jax.experiments import report as rep
from realign_jax.experiments import stages as stages_lib
from realign_jax.training import trainer as trainer_lib
from realign_jax.training.ppo import PPO
from realign_jax.training.sft import SFT

SAMPLES = "samples.jsonl"
METHODS = ("best_of_n", "ppo", "dera", "cd_token_fudge", "cd_token_q", "cd_block", "tq_direct",
           "args")
LABELS = {"best_of_n": "best-of-n", "ppo": "PPO (retrained per beta)", "dera": "DeRa (lambda)",
          "cd_token_fudge": "token-wise CD, FUDGE", "cd_token_q": "token-wise CD, Q-head",
          "cd_block": "blockwise CD (K)",
          "tq_direct": "Transfer Q* direct (alpha)", "args": "ARGS (w)"}
# NOTE: the KL budgets of the report's "best method under a budget" table, in nats.
BUDGETS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def _name(prefix: str, x: float) -> str:
  return f"{prefix}{x:g}"


def _check_grid(name: str, values, *, positive: bool = False, integer: bool = False,
                nonneg: bool = False) -> list:
  vals = list(values)
  if not vals:
    raise UserError(f"frontier.{name} is empty")
  for v in vals:
    if integer and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
      raise UserError(f"frontier.{name} must hold integers >= 1, got {v!r}")
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
      raise UserError(f"frontier.{name} must hold finite numbers, got {v!r}")
    if positive and not v > 0:
      raise UserError(f"frontier.{name} must hold numbers > 0, got {v!r}")
    if nonneg and v < 0:
      raise UserError(f"frontier.{name} must hold numbers >= 0, got {v!r}")
  if len(set(vals)) != len(vals):
    raise UserError(f"frontier.{name} holds duplicates: {vals}")
  return vals


def frontier(*, model_dir: str, sft: SFT, ppo: PPO, sft_steps: int, ppo_steps: int,
             value_steps: int, sft_optimizer: stages_lib.OptimizerSpec,
             ppo_optimizer: stages_lib.OptimizerSpec,
             value_optimizer: stages_lib.OptimizerSpec,
             trainer_config: trainer_lib.TrainerConfig = trainer_lib.TrainerConfig(),
             methods: Sequence[str] = METHODS,
             betas: Sequence[float] = (0.3, 0.1, 0.03), aligned_beta: float = 0.1,
             lambdas: Sequence[float] = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0),
             best_of_n: Sequence[int] = (1, 2, 4, 8, 16, 32),
             cd_betas: Sequence[float] = (3.0, 1.0, 0.3), cd_top_k: int = 10,
             cd_q_top_k: Sequence[int] | int = (10, 0),
             block_candidates: Sequence[int] = (2, 4, 8), block_length: int = 4,
             tq_alphas: Sequence[float] = (10.0, 10 / 3, 1.0),
             tq_alpha_convention: str = "paper", tq_top_k: int = 10,
             tq_horizon: int = 16, args_weights: Sequence[float] = (0.3, 1.0, 3.0),
             args_top_k: int = 10, value_batch_size: int = 32, cdq_target_period: int = 10,
             cdq_output_head: str = "lm+scalar:dueling", cdq_advantage_l2: float = 3e-2,
             num_prompts: int = 64, num_samples: int = 2, batch_size: int = 16,
             split: str = "validation", seed: int = 0, compilation_cache: bool = True,
             progress: bool = True) -> dict:
  """Runs (or resumes) the study in `model_dir`; returns the results dict."""
  from realign_jax.decoding import controlled
  from realign_jax.decoding.transfer_q import ALPHA_CONVENTIONS, TQConfig
  from realign_jax.inference import run as run_lib
  from realign_jax.inference.method import reward_label
  from realign_jax.inference.methods_cd import BlockwiseCD, TokenwiseCD
  from realign_jax.inference.methods_dera import DeRa
  from realign_jax.inference.methods_tq import ARGS, TransferQ
  from realign_jax.inference.prompts import PromptSource, load_prompts
  from realign_jax.models.api import LanguageModel
  from realign_jax.training.value import CDQValue, FudgeValue
  t_start = time.perf_counter()
  # ---- validate everything before any compute -----------------------------------
  if not model_dir:
    raise UserError("MODEL_DIR is empty")
  methods = list(methods)
  bad = [m for m in methods if m not in METHODS]
  if bad or not methods or len(set(methods)) != len(methods):
    raise UserError(f"frontier.methods must be distinct names from {METHODS}, got {methods}")
  for name, v in (("sft_steps", sft_steps), ("ppo_steps", ppo_steps),
                  ("value_steps", value_steps), ("num_prompts", num_prompts),
                  ("num_samples", num_samples), ("batch_size", batch_size),
                  ("value_batch_size", value_batch_size),
                  ("cdq_target_period", cdq_target_period)):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise UserError(f"frontier.{name} must be an integer >= 1, got {v!r}")
  betas = _check_grid("betas", betas, positive=True)
  lambdas = rep.check_lambdas(lambdas, "frontier.lambdas")
  best_of_n = sorted(_check_grid("best_of_n", best_of_n, integer=True))
  cd_betas = _check_grid("cd_betas", cd_betas, positive=True)
  block_candidates = _check_grid("block_candidates", block_candidates, integer=True)
  if tq_alpha_convention not in ALPHA_CONVENTIONS:
    raise UserError(f"frontier.tq_alpha_convention must be one of {ALPHA_CONVENTIONS}, got "
                    f"{tq_alpha_convention!r}")
  # NOTE: under 'paper' alpha divides Q (the KL weight), so 0 is not a setting.
  tq_alphas = _check_grid("tq_alphas", tq_alphas, positive=tq_alpha_convention == "paper",
                          nonneg=True)
  args_weights = _check_grid("args_weights", args_weights)
  vocab_size = sft.model.vocab_size
  controlled.check_top_k(cd_top_k, vocab_size, "frontier.cd_top_k")
  # one or several candidate counts for the Q-head; 0 = the whole vocabulary
  cd_q_top_ks = [cd_q_top_k] if isinstance(cd_q_top_k, int) else list(cd_q_top_k)
  if not cd_q_top_ks or len(set(cd_q_top_ks)) != len(cd_q_top_ks):
    raise UserError(f"frontier.cd_q_top_k must be distinct candidate counts (0 = the whole "
                    f"vocabulary), got {cd_q_top_k!r}")
  for k in cd_q_top_ks:
    if k != 0:
      controlled.check_top_k(k, vocab_size, "frontier.cd_q_top_k")
  controlled.check_top_k(tq_top_k, vocab_size, "frontier.tq_top_k")
  controlled.check_top_k(args_top_k, vocab_size, "frontier.args_top_k")
  controlled.check_at_least_one("frontier.block_length (M)", block_length)
  controlled.check_at_least_one("frontier.tq_horizon (H)", tq_horizon)
  if ("dera" in methods or "tq_direct" in methods) and aligned_beta not in betas:
    raise UserError(f"frontier.aligned_beta = {aligned_beta} (the DeRa and Transfer Q* "
                    f"baseline) is not one of frontier.betas {betas}")
  if ppo.model.config != sft.model.config:
    raise UserError("SFT.model and PPO.model must be the same model config (PPO starts from SFT)")
  if ppo.kl_target is not None:
    raise UserError("the frontier sweeps a fixed beta: set PPO.kl_target = None")
  if compilation_cache:
    stages_lib.enable_compilation_cache(stages_lib.compilation_cache_dir(model_dir))

  need_ppo = [b for b in betas if "ppo" in methods or (
      b == aligned_beta and ("dera" in methods or "tq_direct" in methods))]
  need_fudge = "cd_token_fudge" in methods or "cd_block" in methods
  need_cdq = "cd_token_q" in methods
  decodes = {"best_of_n": 1, "ppo": len(betas), "dera": 1, "cd_token_fudge": len(cd_betas),
             "cd_token_q": len(cd_betas) * len(cd_q_top_ks), "cd_block": len(block_candidates),
             "tq_direct": len(tq_alphas), "args": len(args_weights)}
  total = 1 + len(need_ppo) + need_fudge + need_cdq + sum(decodes[m] for m in methods)
  runner = stages_lib.StageRunner(model_dir, total=total)
  sft_dir = runner.stage_dir("sft")
  reward = ppo.reward
  sampling = ppo.sampling
  # prompts and the reward, as every decode stage will see them
  source = PromptSource(task=ppo.task, split=split, data_dir=ppo.data_dir,
                        vocab_path=ppo.vocab_path, max_prompts=num_prompts,
                        input_length=ppo.input_length)
  _, prompts, inputs = load_prompts(source, sft.model.config)
  if len(prompts) < num_prompts:
    raise UserError(f"frontier.num_prompts is {num_prompts} but task {ppo.task} split {split} "
                    f"holds only {len(prompts)} examples")
  ev = {"task": ppo.task, "split": split, "num_prompts": num_prompts, "seed": seed,
        "input_length": ppo.input_length, "sampling": sampling, "reward": reward,
        "batch_size": batch_size}

  # ---- training ------------------------------------------------------------------------
  sft_set = stages_lib.train_settings(sft, sft_steps, sft_optimizer, trainer_config)
  runner.run("sft", sft_set, lambda d: stages_lib.train_stage(
      d, sft, sft_steps, sft_optimizer, trainer_config))

  def train_from_sft(name, alg, steps, optimizer, **layout):
    # NOTE: paths of other stages are the layout, not settings.
    settings = {"sft": sft_set, "run": stages_lib.train_settings(
        dataclasses.replace(alg, **{k: "<sft stage>" for k in layout}), steps, optimizer,
        trainer_config)}
    runner.run(name, settings, lambda d: stages_lib.train_stage(d, alg, steps, optimizer,
                                                                trainer_config))
    return settings

  trained = {}
  for b in need_ppo:
    alg = dataclasses.replace(ppo, beta=float(b), init_checkpoint=sft_dir)
    trained[_name("ppo_beta", b)] = train_from_sft(_name("ppo_beta", b), alg, ppo_steps,
                                                   ppo_optimizer, init_checkpoint=True)
  value_kw = dict(model=LanguageModel(sft.model.config), reward=reward,
                  reference_checkpoint=sft_dir, init_checkpoint=sft_dir, task=ppo.task,
                  batch_size=value_batch_size, input_length=ppo.input_length,
                  max_new_tokens=ppo.max_new_tokens, data_dir=ppo.data_dir,
                  vocab_path=ppo.vocab_path)
  if need_fudge:
    trained["value_fudge"] = train_from_sft(
        "value_fudge", FudgeValue(**value_kw), value_steps, value_optimizer,
        reference_checkpoint=True, init_checkpoint=True)
  if need_cdq:
    trained["value_cdq"] = train_from_sft(
        "value_cdq", CDQValue(**value_kw, target_ema=0.0, target_period=cdq_target_period,
                              output_head=cdq_output_head, advantage_l2=cdq_advantage_l2),
        value_steps, value_optimizer, reference_checkpoint=True, init_checkpoint=True)

  # ---- decoding: one method of the inference package per stage ----------------------------
  score = _scorer(reward, inputs, sampling.max_new_tokens)

  def decode_stage(name, deps, setting, method, n=num_samples):
    def fn(d):
      # NOTE: the one loop gives every process every row.
      rows, summary = run_lib.run(method, ref_checkpoint=sft_dir, prompts=source,
                                  batch_size=batch_size, num_samples=n, sampling=sampling,
                                  seed=seed, progress=progress)
      for r, s in zip(rows, score(rows)):
        r["reward"] = s
      stages_lib.write_jsonl(os.path.join(d, SAMPLES), rows)
      return {k: summary[k] for k in ("compile_s", "decode_s", "tokens_per_s",
                                      "block_latency_s") if k in summary}
    settings = {"eval": ev, "num_samples": n, "setting": setting,
                "depends_on": {k: trained.get(k, sft_set) for k in deps}}
    return runner.run(name, settings, fn, files=lambda result: [SAMPLES])

  decoded = []  # (method, setting label, stage name, stage result)

  def add(method, setting, stage, result):
    decoded.append((method, setting, stage, result))

  if "best_of_n" in methods:
    add("best_of_n", None, "best_of_n", decode_stage(
        "best_of_n", ["sft"], {"n_max": best_of_n[-1]}, DeRa(), n=best_of_n[-1]))
  if "ppo" in methods:
    for b in betas:
      st = _name("ppo_beta", b) + "_eval"
      add("ppo", f"beta={b:g}", st, decode_stage(
          st, [_name("ppo_beta", b)], {"beta": b},
          DeRa(aligned_checkpoint=runner.stage_dir(_name("ppo_beta", b)), lambdas=[1.0])))
  aligned_dir = runner.stage_dir(_name("ppo_beta", aligned_beta))
  if "dera" in methods:
    add("dera", None, "dera_sweep", decode_stage(
        "dera_sweep", [_name("ppo_beta", aligned_beta)], {"lambdas": lambdas},
        DeRa(aligned_checkpoint=aligned_dir, lambdas=lambdas)))
  for method, value_stage, top_k in ([("cd_token_fudge", "value_fudge", cd_top_k)] +
                                     [("cd_token_q", "value_cdq", k) for k in cd_q_top_ks]):
    if method in methods:
      for b in cd_betas:
        st = _name(f"{method}_k{top_k}_beta", b)
        add(method, f"beta={b:g},k={top_k or 'vocab'}", st, decode_stage(
            st, [value_stage], {"beta": b, "top_k": top_k},
            TokenwiseCD(value_checkpoint=runner.stage_dir(value_stage), beta=float(b),
                        top_k=top_k)))
  if "cd_block" in methods:
    for k in block_candidates:
      st = f"cd_block_K{k}"
      add("cd_block", f"K={k},M={block_length}", st, decode_stage(
          st, ["value_fudge"], {"K": k, "M": block_length},
          BlockwiseCD(value_checkpoint=runner.stage_dir("value_fudge"), num_candidates=k,
                      block_length=block_length)))
  if "tq_direct" in methods:
    authors = tq_alpha_convention == "authors"
    for a in tq_alphas:
      st = _name("tq_direct_authors_alpha" if authors else "tq_direct_alpha", a)
      tq = TQConfig(top_k=tq_top_k, horizon=tq_horizon, alpha=float(a), num_rollouts=1,
                    mode="direct", rollout=sampling, alpha_convention=tq_alpha_convention)
      add("tq_direct", f"alpha={a:g}" + (",authors" if authors else ""), st, decode_stage(
          st, [_name("ppo_beta", aligned_beta)], {"tq": tq},
          TransferQ(baseline_checkpoint=aligned_dir, reward=reward, tq=tq)))
  if "args" in methods:
    for w in args_weights:
      st = _name("args_w", w)
      add("args", f"w={w:g}", st, decode_stage(
          st, ["sft"], {"weight": w, "top_k": args_top_k},
          ARGS(reward=reward, top_k=args_top_k, weight=float(w))))

  # ---- results and report ----------------------------------------------------------------
  entries, reference_rows = [], None
  for method, setting, stage, result in decoded:
    rows = stages_lib.read_jsonl(os.path.join(runner.stage_dir(stage), SAMPLES))
    extra = {"stage": stage, "stage_seconds": runner.timings.get(stage), **result}
    if method == "best_of_n":
      reference_rows = rows  # NOTE: samples of p itself: the optimum's reference
      entries += [dict(e, **extra) for e in best_of_n_entries(rows, best_of_n)]
    elif method == "dera":
      for lam in lambdas:
        entries.append(dict(entry(method, f"lambda={lam:g}", [r for r in rows
                                                             if r["lam"] == lam]), **extra))
    else:
      entries.append(dict(entry(method, setting, rows), **extra))
  results = build_results(entries, settings={
      "task": ppo.task, "split": split, "num_prompts": num_prompts, "num_samples": num_samples,
      "max_new_tokens": sampling.max_new_tokens, "reward": reward_label(reward),
      "sft_steps": sft_steps, "ppo_steps": ppo_steps, "value_steps": value_steps,
      "aligned_beta": aligned_beta, "cd_top_k": cd_top_k, "cd_q_top_k": cd_q_top_ks,
      "block_length": block_length,
      "tq_top_k": tq_top_k, "tq_horizon": tq_horizon,
      "tq_alpha_convention": tq_alpha_convention, "args_top_k": args_top_k,
      "cdq_output_head": cdq_output_head,
      "model": f"{type(sft.model.config).__name__}"}, reference_rows=reference_rows)
  results["stage_seconds"] = dict(runner.timings)
  results["stages_run_now"] = list(runner.ran)
  results["invocation_seconds"] = time.perf_counter() - t_start
  figures = {"frontier": plot_frontier(os.path.join(model_dir, "frontier.png"), results)}
  return rep.write_outputs(model_dir, results, figures, render_report)


# ---- numbers ---------------------------------------------------------------------------
def _scorer(reward, inputs: np.ndarray, max_len: int, chunk: int = 256):
  """rows -> [N] rewards of their tokens (EOS included in `tokens` when emitted)."""
  import jax
  import jax.numpy as jnp
  params = reward.params()
  fn = jax.jit(lambda p, x, y, n: reward.score_tokens(p, x, y, n))

  def score(rows):
    out = []
    for start in range(0, len(rows), chunk):
      part = rows[start:start + chunk]
      idx = [r["prompt_index"] for r in part] + [part[0]["prompt_index"]] * (chunk - len(part))
      toks = np.zeros((chunk, max_len), np.int32)
      lengths = np.ones((chunk,), np.int32)
      for i, r in enumerate(part):
        toks[i, :len(r["tokens"])] = r["tokens"]
        lengths[i] = max(len(r["tokens"]), 1)
      s = np.asarray(fn(params, jnp.asarray(inputs[idx]), jnp.asarray(toks),
                        jnp.asarray(lengths)), np.float64)[:len(part)]
      if not np.all(np.isfinite(s)):
        bad = part[int(np.argmax(~np.isfinite(s)))]
        raise UserError(f"the reward returned a non-finite score for prompt "
                        f"{bad['prompt_index']} sample {bad['sample']}")
      out += s.tolist()
    return out
  return score


def response_length(row: dict) -> int:
  """A response's length: its tokens without EOS, as the length reward (eq. 10) counts them.

  NOTE: decode rows' `length` counts every generated token, EOS included
  (= len(tokens)); the entries' `length` (and the length study's) does not.
  Rows without `tokens` are taken to hold the response length already.
  """
  if "tokens" not in row:
    return int(row["length"])
  from realign_jax.rewards import base
  return len(base.strip_ids(row["tokens"]))


def entry(method: str, setting: Optional[str], rows: Sequence[dict]) -> dict:
  """One method and setting from its decode rows: means and standard errors by prompt."""
  if not rows:
    raise UserError(f"no decode rows for {method} {setting}")
  groups = [r["prompt_index"] for r in rows]
  out = {"method": method, "setting": setting, "num_rows": len(rows)}
  out["reward"], out["reward_se"] = rep.mean_se([r["reward"] for r in rows], groups)
  out["length"], _ = rep.mean_se([response_length(r) for r in rows], groups)
  if all("kl" in r for r in rows):
    out["kl"], out["kl_se"] = rep.mean_se([r["kl"] for r in rows], groups)
    out["kl_kind"], out["kl_bound"] = "exact", None
  else:  # blockwise CD: per-block best-of-K estimator and bound
    out["kl"], out["kl_se"] = rep.mean_se([r["kl_estimate"] for r in rows], groups)
    out["kl_kind"] = "bon_estimator"
    out["kl_bound"] = float(np.mean([r["kl_bound"] for r in rows]))
  return out


def best_of_n_entries(rows: Sequence[dict], ns: Sequence[int]) -> list:
  """Best-of-n for every n from one draw of max(ns) samples per prompt.

  Best-of-n keeps the highest-reward of the prompt's samples 0..n-1 (ties:
  the lowest index, as `decoding.best_of_n`); its KL is the best-of-n
  estimator at eps = p(y) of the kept sample, with the bound and the exact
  best-of-n KL of the prompt's empirical reward levels (all max(ns) samples).
  """
  from realign_jax.evaluation import best_of_n_theory as bon
  by_prompt = {}
  for r in rows:
    by_prompt.setdefault(r["prompt_index"], []).append(r)
  n_max = max(ns)
  for p, rs in by_prompt.items():
    rs.sort(key=lambda r: r["sample"])
    if len(rs) != n_max:
      raise UserError(f"best-of-n: prompt {p} has {len(rs)} samples, not {n_max}")
  out = []
  for n in ns:
    rewards, kls, levels, lengths = [], [], [], []
    for rs in by_prompt.values():
      sc = np.array([r["reward"] for r in rs[:n]])
      best = rs[int(np.argmax(sc))]
      rewards.append(best["reward"])
      lengths.append(response_length(best))
      eps = float(np.clip(np.exp(np.sum(best["ref_logprobs"])), np.finfo(float).tiny, 1.0))
      kls.append(bon.kl_estimator(eps, n))
      levels.append(bon.exact_kl(np.full(n_max, 1.0 / n_max), [r["reward"] for r in rs], n))
    m, se = rep.mean_se(rewards)
    k, kse = rep.mean_se(kls)
    out.append({"method": "best_of_n", "setting": f"n={n}", "num_rows": len(rewards),
                "reward": m, "reward_se": se, "length": float(np.mean(lengths)), "kl": k,
                "kl_se": kse, "kl_kind": "bon_estimator", "kl_bound": bon.kl_bound(n),
                "kl_levels": float(np.mean(levels))})
  return out


def pareto(entries: Sequence[dict]) -> list:
  """Indices of the entries no other entry dominates (reward >= and KL <=, one strictly)."""
  keep = []
  for i, a in enumerate(entries):
    dominated = any(
        b["reward"] >= a["reward"] and b["kl"] <= a["kl"]
        and (b["reward"] > a["reward"] or b["kl"] < a["kl"])
        for j, b in enumerate(entries) if j != i)
    if not dominated:
      keep.append(i)
  return sorted(keep, key=lambda i: entries[i]["kl"])


def budget_table(entries: Sequence[dict], budgets=BUDGETS) -> list:
  """For each KL budget: the entry with the highest mean reward at KL <= budget."""
  out = []
  for b in budgets:
    ok = [e for e in entries if e["kl"] <= b]
    if not ok:
      out.append({"budget": b, "method": None, "setting": None, "reward": None, "kl": None})
      continue
    best = max(ok, key=lambda e: e["reward"])
    out.append({"budget": b, "method": best["method"], "setting": best["setting"],
                "reward": best["reward"], "kl": best["kl"], "kl_kind": best["kl_kind"]})
  return out


def optimum_block(reference_rows: Optional[Sequence[dict]]) -> dict:
  """The KL-regularised optimum from the SFT model's samples (the best_of_n stage's rows).

  Closed form when their rewards take two values (kind "exact", with p0), else
  the self-normalised estimate (kind "estimate", clustered by prompt, with the
  effective sample size per point); kind None without such samples.
  """
  if not reference_rows:
    return {"kind": None, "reason": "no samples of the SFT model (the best_of_n stage did "
                                    "not run)"}
  rewards = [r["reward"] for r in reference_rows]
  curve = opt.optimum_curve(rewards, groups=[r["prompt_index"] for r in reference_rows])
  curve["source"] = "best_of_n"
  curve["num_samples"] = len(rewards)
  curve["reference_reward"] = float(np.mean(rewards))
  return curve


def build_results(entries: list, settings: dict,
                  reference_rows: Optional[Sequence[dict]] = None) -> dict:
  """Frontier, budgets and, with the SFT model's samples, each entry's gap to the optimum.

  gap_to_optimum = the optimum's reward at the entry's KL minus the entry's reward
  (at the KL of its kind: exact, or the best-of-n estimate).
  """
  front = pareto(entries)
  for i, e in enumerate(entries):
    e["pareto"] = i in front
  best = optimum_block(reference_rows)
  for e in entries:
    if best["kind"] is not None and e.get("kl") is not None and math.isfinite(e["kl"]):
      e["optimum_reward_at_kl"] = float(opt.reward_at_kl(best, e["kl"]))
      e["gap_to_optimum"] = e["optimum_reward_at_kl"] - e["reward"]
    else:
      e["optimum_reward_at_kl"] = e["gap_to_optimum"] = None
  return {"entries": entries, "pareto": [[entries[i]["method"], entries[i]["setting"]]
                                         for i in front],
          "budgets": budget_table(entries), "settings": settings, "optimum": best}


def optimum_label(best: dict) -> str:
  if best["kind"] == "exact":
    if len(best["levels"]) == 1:
      return "KL-regularised optimum: the SFT model itself (one reward value)"
    return (f"exact KL-regularised optimum (closed form, SFT success rate p0 = "
            f"{100 * best['p0']:.1f}%)")
  return (f"KL-regularised optimum, estimated (self-normalised, "
          f"{best['num_samples']} SFT samples)")


# ---- figure and report -------------------------------------------------------------------
def _curve(e: dict) -> str:
  """The part of a setting that makes a separate curve: the candidate count k."""
  return "k=" + e["setting"].split(",k=")[-1] if ",k=" in (e["setting"] or "") else ""


def _curves(entries: list) -> list:
  """(method, curve) in METHODS order, curves in order of appearance."""
  seen = []
  for method in METHODS:
    for e in entries:
      if e["method"] == method and (method, _curve(e)) not in seen:
        seen.append((method, _curve(e)))
  return seen


def plot_frontier(path: str, results: dict) -> str:
  plt = rep._plt()
  fig, ax = plt.subplots(figsize=(7.0, 4.8))
  markers = dict(zip(METHODS, "os^v<>Dp"))
  best = results.get("optimum") or {"kind": None}  # NOTE: absent from older results
  if best["kind"] is not None:
    ck, cr = list(best["kl"]), list(best["reward"])
    # NOTE: beyond its largest KL the optimum's reward stays at the reward's maximum.
    far = max([e["kl"] for e in results["entries"] if e.get("kl") is not None] + [ck[-1]])
    if far > ck[-1]:
      ck, cr = ck + [far], cr + [cr[-1]]
    ax.plot(ck, cr, color="black", linewidth=1.6, label=optimum_label(best))
    if best["kind"] == "estimate" and any(best["small_ess"]):
      lo = min(k for k, f in zip(best["kl"], best["small_ess"]) if f)
      ax.axvspan(lo, max(ck), color="grey", alpha=0.1,
                 label=f"optimum estimate unreliable (ESS < "
                       f"{100 * opt.SMALL_ESS_FRACTION:.0f}% of samples)")
  for method, curve in _curves(results["entries"]):
    es = [e for e in results["entries"] if e["method"] == method and _curve(e) == curve]
    # NOTE: points joined in the order of the method's grid (n, lambda, beta, ...).
    exact = es[0]["kl_kind"] == "exact"
    label = LABELS[method] + (f" ({curve})" if curve else "") + (
        "" if exact else " [KL: best-of-n estimator]")
    line = ax.errorbar([e["kl"] for e in es], [e["reward"] for e in es],
                       xerr=[e["kl_se"] for e in es], yerr=[e["reward_se"] for e in es],
                       marker=markers[method], capsize=2, linewidth=1.2, label=label,
                       markerfacecolor=None if exact else "none")
    if not exact:
      ax.plot([e["kl_bound"] for e in es], [e["reward"] for e in es], linestyle=":",
              color=line[0].get_color(), marker=markers[method], markerfacecolor="none",
              alpha=0.6, label=f"{LABELS[method]} [KL: bound log n - (n-1)/n]")
    if es[0].get("kl_levels") is not None:
      ax.plot([e["kl_levels"] for e in es], [e["reward"] for e in es], linestyle="--",
              color=line[0].get_color(), marker=markers[method], markerfacecolor="none",
              alpha=0.6, label=f"{LABELS[method]} [KL: exact by reward level, plug-in]")
  ax.set_xscale("symlog", linthresh=0.1)
  ax.set_xlabel("KL(pi || pi_ref), nats (filled: exact; hollow: best-of-n estimates)")
  ax.set_ylabel("mean task reward")
  ax.set_title("Reward against KL to the SFT model")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0,
            title=rep.SE_NOTE, title_fontsize=7)
  out = rep._save(fig, path)
  plt.close(fig)
  return out


def _q_candidates(top_ks) -> str:
  ks = [top_ks] if isinstance(top_ks, int) else top_ks  # NOTE: one int in older results
  return " and ".join(f"the top {k}" if k else "the whole vocabulary" for k in ks)


def _q_head_label(settings: dict) -> str:
  head = settings.get("cdq_output_head", "lm")  # NOTE: older results used the plain Q-head
  return ("dueling Q-head (V(s) + A(s, z), unvisited tokens at V(s))" if "dueling" in head
          else "Q-head")


def optimum_section(res: dict) -> list:
  """What the optimum's curve is, where it comes from, and who comes closest to it."""
  f = rep.fmt
  best = res.get("optimum") or {"kind": None, "reason": "not computed by this version"}
  lines = ["## Against the KL-regularised optimum", ""]
  if best["kind"] is None:
    return lines + [f"No optimum: {best['reason']}.", ""]
  lines.append(
      "For each KL weight beta the policy maximising E[r] - beta KL(pi || p) is p exp(r / beta) "
      "/ Z; its (KL, reward) pairs over beta are the best any method can reach, the black "
      "curve in the figure. `optimum at this KL` is that curve's reward at the entry's KL "
      "(of the entry's kind), `gap to optimum` that minus the entry's reward (> 0: below the "
      "optimum).")
  if best["kind"] == "exact":
    lines.append(
        f"The reward takes {len(best['levels'])} value(s) in the {best['num_samples']} samples "
        f"of the SFT model (the best_of_n stage)" + (
            f", {best['levels'][1]:g} with probability p0 = {100 * best['p0']:.1f}%: the curve "
            f"is the exact KL-regularised optimum (closed form from p0), from KL 0 (reward "
            f"{f(best['reference_reward'])}) to KL -log p0 = {f(best['kl'][-1])} nats (reward {f(best['reward'][-1])})."
            if len(best["levels"]) == 2 else ": the SFT model is already optimal."))
  else:
    small = [k for k, s in zip(best["kl"], best["small_ess"]) if s]
    lines.append(
        f"The reward takes more than two values: the curve is the self-normalised estimate "
        f"from the {best['num_samples']} samples of the SFT model (weights exp(r / beta); "
        f"standard errors by the delta method, clustered by prompt, in results.json)." + (
            f" **Beyond KL {f(min(small))} nats the effective sample size falls below "
            f"{100 * opt.SMALL_ESS_FRACTION:.0f}% of the samples: the estimate there rests on a "
            f"few responses.**" if small else ""))
  gaps = [e for e in res["entries"] if e.get("gap_to_optimum") is not None]
  if gaps:
    near = min(gaps, key=lambda e: e["gap_to_optimum"])
    far = max(gaps, key=lambda e: e["gap_to_optimum"])
    def where(e):
      g = e["gap_to_optimum"]
      return (f"{f(g)} below it" if g >= 0 else f"{f(-g)} above it: sampling noise or a KL "
              f"underestimate, since no policy beats the optimum") + f" at {f(e['kl'])} nats"
    lines.append(f"Closest to the optimum: {LABELS[near['method']]} {near['setting'] or ''} "
                 f"({where(near)}); farthest: {LABELS[far['method']]} {far['setting'] or ''} "
                 f"({where(far)}).")
  return lines + [""]


def render_report(res: dict) -> str:
  f = rep.fmt
  s = res["settings"]
  lines = ["# Reward against KL: every alignment method on one task", "",
           f"Task `{s['task']}`, reward `{s['reward']}`; model {s['model']}; SFT {s['sft_steps']} "
           f"steps, PPO {s['ppo_steps']} steps per beta, value models {s['value_steps']} steps. "
           f"Evaluation: the first {s['num_prompts']} prompts of `{s['split']}`, "
           f"{s['num_samples']} samples each (best-of-n: its own draw), temperature 1, at most "
           f"{s['max_new_tokens']} tokens. DeRa and Transfer Q* use the PPO model at beta = "
           f"{s['aligned_beta']:g}; token-wise CD scores the top {s['cd_top_k']} tokens of p "
           f"with the FUDGE value and " + _q_candidates(s["cd_q_top_k"]) +
           f" with the {_q_head_label(s)}; blockwise CD draws blocks of "
           f"{s['block_length']} tokens; TQ* takes the top {s['tq_top_k']} with rollouts of "
           f"{s['tq_horizon']} tokens" + (
               # NOTE: results written before the option existed used the authors' form.
               ", alpha as the paper's KL weight (p exp(Q / alpha): larger = closer to p)"
               if s.get("tq_alpha_convention", "authors") == "paper" else
               ", alpha as in the authors' code (log p + alpha Q: larger = further from p)") +
           f"; ARGS the top {s['args_top_k']}.", "",
           "KL kinds: **exact** = mean over responses of the sum over steps of the "
           "full-vocabulary KL of the method's per-token distribution to p; "
           "**bon_estimator** = best-of-n estimator KL_hat(p(y), n) of the kept response (per "
           "block for blockwise CD), with the bound log n - (n - 1)/n alongside. For best-of-n, "
           "`KL levels` is the exact best-of-n KL of each prompt's empirical reward distribution "
           "(its samples' reward levels): with a reward that ties, far below the bound.", ""]
  rows = []
  for e in res["entries"]:
    rows.append([LABELS[e["method"]], e["setting"] or "",
                 f"{f(e['reward'])} ± {f(e['reward_se'])}",
                 f"{f(e['kl'])} ± {f(e['kl_se'])}", e["kl_kind"], f(e.get("kl_bound")),
                 f(e.get("kl_levels")), f(e["length"], 1), "yes" if e["pareto"] else "",
                 f(e.get("optimum_reward_at_kl")), f(e.get("gap_to_optimum"))])
  lines += ["## Results", "", rep.markdown_table(
      ["method", "setting", "reward", "KL (nats)", "KL kind", "KL bound", "KL levels",
       "length", "on the frontier", "optimum at this KL", "gap to optimum"], rows), "",
      "Means ± standard errors (clustered by prompt; best-of-n: over prompts).", ""]
  lines += optimum_section(res)
  trunc = [e for e in res["entries"] if e["method"] == "args" and e["setting"] == "w=0"]
  if trunc:
    t = trunc[0]
    lines += [f"Sampling p truncated to its top {s['args_top_k']} tokens (ARGS at w = 0) costs "
              f"{f(t['kl'])} nats of KL by itself (reward {f(t['reward'])}): every method that "
              f"restricts each step to the top-k of p (token-wise CD over the top-k, Transfer Q*, "
              f"ARGS) starts from about there.", ""]
  lines += ["## The frontier", "",
            "Entries no other entry beats on both reward and KL (point estimates), by KL: " +
            "; ".join(f"{LABELS[m]} {st or ''}".strip() for m, st in res["pareto"]) + ".", ""]
  brow = [[f"{b['budget']:g}", "none" if b["method"] is None else
           f"{LABELS[b['method']]} {b['setting'] or ''}".strip(), f(b["reward"]), f(b["kl"])]
          for b in res["budgets"]]
  lines += ["Best mean reward within a KL budget:", "",
            rep.markdown_table(["KL budget (nats)", "method", "reward", "KL"], brow), ""]
  lines += ["## Figure", "", "![reward against KL](frontier.png)", "", "## Time", ""]
  st = res["stage_seconds"]
  extra = {e["stage"]: e for e in res["entries"]}
  lines.append(rep.markdown_table(
      ["stage", "wall seconds", "decode tokens/s", "compile s"],
      [[k, f"{v:.0f}" if v == v else "n/a", f(extra.get(k, {}).get("tokens_per_s"), 0),
        f(extra.get(k, {}).get("compile_s"), 1)] for k, v in st.items()]))
  lines += ["", f"This invocation: {res['invocation_seconds']:.0f} s wall on {os.cpu_count()} "
            f"cores (stages run now: {', '.join(res['stages_run_now']) or 'none, all cached'})."]
  return "\n".join(lines) + "\n"


def main(argv: list) -> int:
  res = gin_utils.call(gin_utils.configure_binary(argv, "frontier", frontier))
  print(f"{len(res['entries'])} entries; frontier: "
        + "; ".join(f"{m} {s or ''}".strip() for m, s in res["pareto"]))
  print(f"report: {res['report']}; plot: {res['figure_paths']['frontier']}")
  return 0


if __name__ == "__main__":
  gin_utils.run_main(main)
