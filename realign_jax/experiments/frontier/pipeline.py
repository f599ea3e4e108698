"""The frontier study's stage graph: every alignment method against KL to the SFT model.

Training stages (each in its own subdirectory of MODEL_DIR, cached: a rerun resumes):
  sft              SFT on the task: the reference p
  ppo_beta{B}      PPO from SFT with the task reward at every beta of `FrontierMethods.betas`
  value_fudge      CD-FUDGE value model (scalar head), trunk from SFT
  value_cdq        CD-Q Q-head, trunk from SFT, target network copied periodically
Decoding stages, all through the one batch loop (`realign_jax.inference.run.run`)
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

import dataclasses
import functools
import os
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from realign_jax.decoding.transfer_q import TQConfig
from realign_jax.plumbing.errors import UserError
from realign_jax.experiments import report as rep
from realign_jax.experiments import stages
from realign_jax.experiments.config import StudyEvaluation, StudyOptions, check_model_dir
from realign_jax.experiments.frontier import config as cfg
from realign_jax.experiments.frontier import report, results
from realign_jax.experiments.samples import read_samples, samples_file, write_samples
from realign_jax.inference import run as run_lib
from realign_jax.inference.method import DecodeMethod, reward_label
from realign_jax.inference.methods_cd import BlockwiseCD, TokenwiseCD
from realign_jax.inference.methods_dera import DeRa
from realign_jax.inference.methods_tq import ARGS, TransferQ
from realign_jax.inference.prompts import PromptSource, load_prompts
from realign_jax.models.api import LanguageModel
from realign_jax.training.value import CDQValue, FudgeValue


def frontier(*, model_dir: str, models: cfg.FrontierModels, training: cfg.FrontierTraining,
             methods: cfg.FrontierMethods, evaluation: StudyEvaluation,
             options: StudyOptions = StudyOptions()) -> dict:
  """Runs (or resumes) the study in `model_dir`; returns the results dict."""
  t_start = time.perf_counter()
  check_model_dir(model_dir)  # NOTE: every setting is checked before any compute
  methods = cfg.check_all(models, training, methods, evaluation)
  options.start(model_dir)
  study = _Study(model_dir, models, training, methods, evaluation, options)
  study.train()
  decoded = study.decode()
  res = study.results(decoded, time.perf_counter() - t_start)
  figures = {"frontier": report.plot_frontier(os.path.join(model_dir, "frontier.png"), res)}
  return rep.write_outputs(model_dir, res, figures, report.render_report)


def _name(prefix: str, x: float) -> str:
  return f"{prefix}{x:g}"


@dataclasses.dataclass(frozen=True)
class Decode:
  """One decode stage: its entry's method and setting, what it depends on, how it decodes."""
  method: str  # one of cfg.METHODS
  setting: Optional[str]  # the entry's setting label (DeRa: one entry per lambda)
  stage: str
  depends_on: list  # the training stages it decodes with
  recorded: dict  # its own settings, as its stage records them
  decoder: DecodeMethod
  num_samples: Optional[int] = None  # None: StudyEvaluation.num_samples


def decode_plan(m: cfg.FrontierMethods, stage_dir: Callable[[str], str], reward,
                sampling) -> list:
  """Every decode stage of the methods asked for, in order (`Decode`)."""
  plan = []
  aligned = _name("ppo_beta", m.aligned_beta)
  if "best_of_n" in m.methods:
    plan.append(Decode("best_of_n", None, "best_of_n", ["sft"], {"n_max": m.best_of_n[-1]},
                       DeRa(), m.best_of_n[-1]))
  if "ppo" in m.methods:
    for b in m.betas:
      run = _name("ppo_beta", b)
      plan.append(Decode("ppo", f"beta={b:g}", run + "_eval", [run], {"beta": b},
                         DeRa(aligned_checkpoint=stage_dir(run), lambdas=[1.0])))
  if "dera" in m.methods:
    plan.append(Decode("dera", None, "dera_sweep", [aligned], {"lambdas": m.lambdas},
                       DeRa(aligned_checkpoint=stage_dir(aligned), lambdas=m.lambdas)))
  for method, value_stage, top_k in ([("cd_token_fudge", "value_fudge", m.cd_top_k)] +
                                     [("cd_token_q", "value_cdq", k) for k in m.q_top_ks]):
    if method in m.methods:
      for b in m.cd_betas:
        plan.append(Decode(method, f"beta={b:g},k={top_k or 'vocab'}",
                           _name(f"{method}_k{top_k}_beta", b), [value_stage],
                           {"beta": b, "top_k": top_k},
                           TokenwiseCD(value_checkpoint=stage_dir(value_stage), beta=float(b),
                                       top_k=top_k)))
  if "cd_block" in m.methods:
    for k in m.block_candidates:
      plan.append(Decode("cd_block", f"K={k},M={m.block_length}", f"cd_block_K{k}",
                         ["value_fudge"], {"K": k, "M": m.block_length},
                         BlockwiseCD(value_checkpoint=stage_dir("value_fudge"), num_candidates=k,
                                     block_length=m.block_length)))
  if "tq_direct" in m.methods:
    authors = m.tq_alpha_convention == "authors"
    for a in m.tq_alphas:
      tq = TQConfig(top_k=m.tq_top_k, horizon=m.tq_horizon, alpha=float(a), num_rollouts=1,
                    mode="direct", rollout=sampling, alpha_convention=m.tq_alpha_convention)
      plan.append(Decode("tq_direct", f"alpha={a:g}" + (",authors" if authors else ""),
                         _name("tq_direct_authors_alpha" if authors else "tq_direct_alpha", a),
                         [aligned], {"tq": tq},
                         TransferQ(baseline_checkpoint=stage_dir(aligned), reward=reward, tq=tq)))
  if "args" in m.methods:
    for w in m.args_weights:
      plan.append(Decode("args", f"w={w:g}", _name("args_w", w), ["sft"],
                         {"weight": w, "top_k": m.args_top_k},
                         ARGS(reward=reward, top_k=m.args_top_k, weight=float(w))))
  return plan


class _Study:
  """The stages of one invocation: training (`train`), then decoding (`decode`)."""

  def __init__(self, model_dir, models, training, methods, evaluation, options):
    self.models, self.training, self.methods = models, training, methods
    self.evaluation, self.options = evaluation, options
    m, ppo = methods, models.ppo
    self.need_ppo = [b for b in m.betas if "ppo" in m.methods or (
        b == m.aligned_beta and m.uses_aligned(m.methods))]
    self.need_fudge = "cd_token_fudge" in m.methods or "cd_block" in m.methods
    self.need_cdq = "cd_token_q" in m.methods
    self.plan = decode_plan(m, functools.partial(os.path.join, model_dir), ppo.reward,
                            ppo.sampling)
    total = 1 + len(self.need_ppo) + self.need_fudge + self.need_cdq + len(self.plan)
    self.runner = stages.StageRunner(model_dir, total=total)
    ev = evaluation
    # prompts and the reward, as every decode stage will see them
    self.source = PromptSource(task=ppo.task, split=ev.split, data_dir=ppo.data_dir,
                               vocab_path=ppo.vocab_path, max_prompts=ev.num_prompts,
                               input_length=ppo.input_length)
    _, prompts, self.inputs = load_prompts(self.source, models.sft.model.config)
    if len(prompts) < ev.num_prompts:
      raise UserError(f"StudyEvaluation.num_prompts is {ev.num_prompts} but task {ppo.task} "
                      f"split {ev.split} holds only {len(prompts)} examples")
    self.ev = {"task": ppo.task, "split": ev.split, "num_prompts": ev.num_prompts,
               "seed": ev.seed, "input_length": ppo.input_length, "sampling": ppo.sampling,
               "reward": ppo.reward, "batch_size": ev.batch_size}
    self.trained = {}  # training stage -> its recorded settings

  def train_from_sft(self, name: str, alg, steps: int, optimizer, **layout) -> None:
    """Stage `name`: `alg` from the SFT stage (`layout`: its fields that name stage paths)."""
    tc = self.training.trainer_config
    # NOTE: paths of other stages are the layout, not settings.
    settings = {"sft": self.sft_set, "run": stages.train_settings(
        dataclasses.replace(alg, **{k: "<sft stage>" for k in layout}), steps, optimizer, tc)}
    self.runner.train(name, settings, alg, steps, optimizer, tc)
    self.trained[name] = settings

  def train(self) -> None:
    t, sft, ppo = self.training, self.models.sft, self.models.ppo
    self.sft_set = stages.train_settings(sft, t.sft_steps, t.sft_optimizer, t.trainer_config)
    self.runner.train("sft", self.sft_set, sft, t.sft_steps, t.sft_optimizer, t.trainer_config)
    sft_dir = self.runner.stage_dir("sft")
    for b in self.need_ppo:
      alg = dataclasses.replace(ppo, beta=float(b), init_checkpoint=sft_dir)
      self.train_from_sft(_name("ppo_beta", b), alg, t.ppo_steps, t.ppo_optimizer,
                          init_checkpoint=True)
    value_kw = dict(model=LanguageModel(sft.model.config), reward=ppo.reward,
                    reference_checkpoint=sft_dir, init_checkpoint=sft_dir, task=ppo.task,
                    batch_size=t.value_batch_size, input_length=ppo.input_length,
                    max_new_tokens=ppo.max_new_tokens, data_dir=ppo.data_dir,
                    vocab_path=ppo.vocab_path)
    if self.need_fudge:
      self.train_from_sft("value_fudge", FudgeValue(**value_kw), t.value_steps,
                          t.value_optimizer, reference_checkpoint=True, init_checkpoint=True)
    if self.need_cdq:
      self.train_from_sft(
          "value_cdq", CDQValue(**value_kw, target_ema=0.0, target_period=t.cdq_target_period,
                                output_head=t.cdq_output_head,
                                advantage_l2=t.cdq_advantage_l2),
          t.value_steps, t.value_optimizer, reference_checkpoint=True, init_checkpoint=True)

  def decode(self) -> list:
    """Every decode stage of the plan: (method, setting, rows, extra) for `entries_of`."""
    ppo, ev = self.models.ppo, self.evaluation
    score = _scorer(ppo.reward, self.inputs, ppo.sampling.max_new_tokens)
    sft_dir = self.runner.stage_dir("sft")
    decoded = []
    for dec in self.plan:
      n = dec.num_samples or ev.num_samples

      def fn(d, dec=dec, n=n):
        # NOTE: the one loop gives every process every row.
        rows, summary = run_lib.run(dec.decoder, ref_checkpoint=sft_dir, prompts=self.source,
                                    batch_size=ev.batch_size, num_samples=n,
                                    sampling=ppo.sampling, seed=ev.seed,
                                    progress=self.options.progress)
        for r, s in zip(rows, score(rows)):
          r["reward"] = s
        write_samples(d, rows)
        return {k: summary[k] for k in ("compile_s", "decode_s", "tokens_per_s",
                                        "block_latency_s") if k in summary}
      settings = {"eval": self.ev, "num_samples": n, "setting": dec.recorded,
                  "depends_on": {k: self.trained.get(k, self.sft_set) for k in dec.depends_on}}
      result = self.runner.run(dec.stage, settings, fn, files=samples_file)
      decoded.append((dec.method, dec.setting, dec.stage, result))
    return [(method, setting, read_samples(self.runner, stage),
             {"stage": stage, "stage_seconds": self.runner.timings.get(stage), **result})
            for method, setting, stage, result in decoded]

  def results(self, decoded: list, invocation_seconds: float) -> dict:
    t, m, ppo, ev = self.training, self.methods, self.models.ppo, self.evaluation
    entries, reference_rows = results.entries_of(decoded, m.best_of_n, m.lambdas)
    res = results.build_results(entries, settings={
        "task": ppo.task, "split": ev.split, "num_prompts": ev.num_prompts,
        "num_samples": ev.num_samples, "max_new_tokens": ppo.sampling.max_new_tokens,
        "reward": reward_label(ppo.reward), "sft_steps": t.sft_steps, "ppo_steps": t.ppo_steps,
        "value_steps": t.value_steps, "aligned_beta": m.aligned_beta, "cd_top_k": m.cd_top_k,
        "cd_q_top_k": m.q_top_ks, "block_length": m.block_length, "tq_top_k": m.tq_top_k,
        "tq_horizon": m.tq_horizon, "tq_alpha_convention": m.tq_alpha_convention,
        "args_top_k": m.args_top_k, "cdq_output_head": t.cdq_output_head,
        "model": f"{type(self.models.sft.model.config).__name__}"},
        reference_rows=reference_rows)
    res["stage_seconds"] = dict(self.runner.timings)
    res["stages_run_now"] = list(self.runner.ran)
    res["invocation_seconds"] = invocation_seconds
    return res


def _scorer(reward, inputs: np.ndarray, max_len: int, chunk: int = 256):
  """rows -> [N] rewards of their tokens (EOS included in `tokens` when emitted)."""
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
