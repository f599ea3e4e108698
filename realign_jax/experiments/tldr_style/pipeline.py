"""The TL;DR-style study's stage graph (DeRa paper, section 5.3, appendix D.3: Figures 3, 6, 7).

Stages, each in its own subdirectory of MODEL_DIR, cached (a rerun resumes):
  sft                    SFT on the task: the reference pi_ref
  preferences            two samples of pi_ref per prompt, the one the gold
                         reward scores higher is `chosen`: training pairs from
                         the train split, held-out pairs from `heldout_split`
                         (or the TL;DR comparisons release: `TldrPairs`)
  reward_model           Bradley-Terry reward model (trunk from SFT) on them
  eval_sft               samples of pi_ref on the evaluation prompts
  pg_beta{B}             policy gradient on the learned reward at the base beta
  dera_pg                DeRa (pi_ref, that PG model) at every lambda, ONE call
  pg_beta{B/lam}         PG retrained at beta / lam (lam = 1: the base run)
  eval_pg_beta{...}      samples of the base and of every retrained PG model
  dpo_beta{...}, dera_dpo, eval_dpo_beta{...}   the same with DPO (Figure 7)
  pairwise               eq. (14) on the held-out pairs for every model
then writes MODEL_DIR/report.md, results.json and the PNG figures. The gold
reward that labels the pairs and judges the win rates: `gold.py`.

All samples: the same prompts (the first `StudyEvaluation.num_prompts` of its
split), the same row seeds, temperature 1, `TldrModels.max_new_tokens` tokens
at most; KL is the exact sequence KL to pi_ref.
"""

import dataclasses
import os
import time

import flax.linen as nn
import jax
import numpy as np

from realign_jax.plumbing import paths
from realign_jax.data import pipeline
from realign_jax.data import preferences as prefs_lib
from realign_jax.decoding import sampler
from realign_jax.evaluation import pairwise
from realign_jax.experiments import report as rep
from realign_jax.experiments import stages
from realign_jax.experiments.config import StudyEvaluation, StudyOptions, check_model_dir
from realign_jax.experiments.config import describe_model
from realign_jax.experiments.samples import EvalSettings, PolicySampler, eval_inputs
from realign_jax.experiments.samples import read_samples, samples_file, write_samples
from realign_jax.experiments.tldr_style import config as cfg
from realign_jax.experiments.tldr_style import pairs as pairs_lib
from realign_jax.experiments.tldr_style import report, results
from realign_jax.experiments.tldr_style.config import run_name
from realign_jax.experiments.tldr_style.gold import GOLD_NAME, JittedReward, gold_scores
from realign_jax.inference import components, loop
from realign_jax.models.api import LanguageModel
from realign_jax.parallel import partitioning
from realign_jax.rewards.learned import LearnedReward


def tldr_style(*, model_dir: str, models: cfg.TldrModels, training: cfg.TldrTraining,
               pairs: cfg.TldrPairs, evaluation: StudyEvaluation,
               comparison: cfg.TldrComparison, options: StudyOptions = StudyOptions()) -> dict:
  """Runs (or resumes) the study in `model_dir`; returns the results dict."""
  t_start = time.perf_counter()
  check_model_dir(model_dir)  # NOTE: every setting is checked before any compute
  model_dir = paths.abspath(model_dir)
  cfg.check_all(models, training, pairs, evaluation, comparison)
  options.start(model_dir)
  study = _Study(model_dir, models, training, pairs, evaluation, comparison, options)
  study.prepare()
  study.align()
  pw = study.pairwise()
  res = study.results(pw, time.perf_counter() - t_start)
  figures = report.write_figures(model_dir, res)
  return rep.write_outputs(model_dir, res, figures, report.render_report)


class _Study:
  """The stages of one invocation: SFT, pairs and reward model (`prepare`), the aligned
  families (`align`), pairwise accuracy (`pairwise`); then the results."""

  def __init__(self, model_dir, models, training, pairs, evaluation, comparison, options):
    self.model_dir, self.models, self.training, self.pairs = model_dir, models, training, pairs
    self.comparison, self.options = comparison, options
    self.lambdas = comparison.grid().list()
    beta = comparison.beta
    self.retrain = {lam: beta / lam for lam in self.lambdas}
    extra = [lam for lam in self.lambdas
             if run_name("pg", self.retrain[lam]) != run_name("pg", beta)]
    per_family = 3 + 2 * len(extra)  # base run, its eval, the sweep; each extra run + eval
    total = 4 + per_family * len(models.families) + 1
    self.runner = stages.StageRunner(model_dir, total=total)
    sft = models.sft
    self.lm = LanguageModel(sft.model.config, "lm")
    self.mesh, self.rules = partitioning.create_mesh(), partitioning.logical_axis_rules()
    # NOTE: decoding runs through the one loop: on several processes each its own
    # batches on its own devices, so the decoded params live there (one mesh on one).
    self.decode_mesh = loop.host_mesh()
    self.sampling = sampler.SamplingConfig(max_new_tokens=models.max_new_tokens, temperature=1.0)
    self.ev = EvalSettings.of(evaluation, task=sft.task, input_length=models.input_length,
                              max_new_tokens=models.max_new_tokens)
    self.inputs = eval_inputs(self.ev, sft.vocab, sft.data_dir)
    self.eval_refs = [e["targets"] for e in pipeline.text_examples(
        sft.task, evaluation.split, data_dir=sft.data_dir, limit=evaluation.num_prompts)]
    self.sft_dir = self.runner.stage_dir("sft")
    self.run_settings = {}  # a family's run -> its recorded settings
    self.retrained_names = {}  # family -> lambda -> its run

  def free(self, settings):
    return stages.layout_free(settings, self.model_dir)

  # ---- SFT, the preference pairs and the reward model ----------------------------------------
  def prepare(self) -> None:
    m, t, runner = self.models, self.training, self.runner
    self.sft_set = self.free(stages.train_settings(m.sft, t.sft_steps, t.sft_optimizer,
                                                   t.trainer_config))
    runner.train("sft", self.sft_set, m.sft, t.sft_steps, t.sft_optimizer, t.trainer_config)
    pair_set = pairs_lib.recorded_settings(self.pairs)
    self.pair_stats = runner.run("preferences", {"sft": self.sft_set, "pairs": pair_set,
                                                 "input_length": m.input_length,
                                                 "sampling": self.sampling},
                                 self.pairs_stage, files=pairs_lib.pair_files)
    self.train_file = os.path.join(runner.stage_dir("preferences"), pairs_lib.TRAIN_PAIRS)
    self.heldout_file = os.path.join(runner.stage_dir("preferences"), pairs_lib.HELDOUT_PAIRS)
    self.pair_stage_set = {"sft": self.sft_set, "pairs": pair_set}
    self.rm_alg = dataclasses.replace(m.reward_model, init_checkpoint=self.sft_dir,
                                      train_file=self.train_file, eval_file=self.heldout_file)
    self.rm_set = {"pairs": self.pair_stage_set, "rm": self.free(stages.train_settings(
        self.rm_alg, t.reward_model_steps, t.reward_model_optimizer, t.trainer_config))}
    self.rm_result = runner.run("reward_model", self.rm_set, self.reward_model_stage)
    self.learned = self.learned_reward(runner.stage_dir("reward_model"))
    self.sampler = PolicySampler(
        self.lm, self.sft_dir, self.inputs, m.sft.vocab, self.ev, self.sampling,
        JittedReward(self.learned), self.decode_mesh, self.rules, self.options.progress)
    self.eval_common = {"eval": self.ev, "reward_model": self.rm_set, "gold": GOLD_NAME}
    runner.run("eval_sft", dict(self.eval_common, policy=self.sft_set),
               lambda d: self.decode_policy(d, self.sft_dir, "eval_sft"), files=samples_file)

  def pairs_stage(self, d: str) -> dict:
    p = self.pairs
    if p.comparisons_dir:
      return pairs_lib.write_human_pairs(d, p.comparisons_dir, p.heldout_split,
                                         p.num_train_prompts, p.num_heldout_prompts)
    params = components.load_lm_params(self.sft_dir, self.lm, self.decode_mesh, self.rules)
    return pairs_lib.write_synthetic_pairs(
        d, p, lm=self.lm, params=params, sft=self.models.sft, sampling=self.sampling,
        input_length=self.models.input_length, batch_size=self.ev.batch_size,
        mesh=self.decode_mesh, rules=self.rules)

  def learned_reward(self, rm_dir: str) -> LearnedReward:
    return LearnedReward(model_dir=rm_dir, vocab_path=self.rm_alg.vocab_path,
                         input_length=self.models.input_length,
                         target_length=self.rm_alg.target_length, batch_size=self.ev.batch_size)

  def reward_model_stage(self, d: str) -> dict:
    """Trains the reward model; its accuracy on the held-out pairs."""
    t = self.training
    out = stages.train_stage(d, self.rm_alg, t.reward_model_steps, t.reward_model_optimizer,
                             t.trainer_config)
    rows, _ = prefs_lib.load_preference_jsonl(self.heldout_file)
    reward = self.learned_reward(d)
    prompts = [r["prompt"] for r in rows]
    rc = reward.score(prompts, [r["chosen"] for r in rows])
    rr = reward.score(prompts, [r["rejected"] for r in rows])
    acc, se = rep.mean_se((rc > rr).astype(np.float64))
    out["heldout_accuracy"], out["heldout_accuracy_se"] = acc, se
    out["heldout_pairs"] = len(rows)
    return out

  # ---- decoding --------------------------------------------------------------------------
  def decode(self, d: str, policy_dir: str, lambdas, desc: str) -> list:
    """Samples `policy_dir` (lambdas: DeRa of pi_ref and it), scored by the gold reward."""
    if jax.process_count() > 1:
      # NOTE: each process scores its own batches: the reward's params on its devices.
      self.learned.setup(self.decode_mesh, self.rules)
    rows = self.sampler.rows(policy_dir, desc, lambdas=lambdas)
    gold = gold_scores([self.eval_refs[r["prompt_index"]] for r in rows],
                       [r["response"] for r in rows])
    for r, g in zip(rows, gold):
      r["gold"] = float(g)
    write_samples(d, rows)
    return rows

  def decode_policy(self, d: str, policy_dir: str, desc: str) -> dict:
    rows = self.decode(d, policy_dir, None, desc)
    return rep.summarize_rows(rows, fields=("reward", "gold", "kl", "length"))

  # ---- aligned models: PG on the learned reward, DPO on the pairs ---------------------------
  def make_alg(self, family: str, beta: float):
    m = self.models
    if family == "pg":
      return m.pg(reward=self.learned, init_checkpoint=self.sft_dir, beta=float(beta),
                  task=m.sft.task, input_length=m.input_length, max_new_tokens=m.max_new_tokens)
    return dataclasses.replace(m.dpo, beta=float(beta), init_checkpoint=self.sft_dir,
                               train_file=self.train_file, eval_file=self.heldout_file)

  def train_run(self, family: str, beta: float) -> str:
    """A family's run at `beta` and its samples (once); returns the run's stage name."""
    name = run_name(family, beta)
    if name in self.run_settings:
      return name
    alg = self.make_alg(family, beta)
    steps, opt = self.training.of(family)
    tc = self.training.trainer_config
    depends = {"pg": self.rm_set, "dpo": self.pair_stage_set}[family]
    settings = {"depends": depends,
                family: self.free(stages.train_settings(alg, steps, opt, tc))}
    self.runner.train(name, settings, alg, steps, opt, tc)
    self.run_settings[name] = settings
    self.runner.run("eval_" + name, dict(self.eval_common, policy=settings),
                    lambda d: self.decode_policy(d, self.runner.stage_dir(name), "eval_" + name),
                    files=samples_file)
    return name

  def align(self) -> None:
    for family in self.models.families:
      base = self.train_run(family, self.comparison.beta)
      sweep = "dera_" + family
      self.runner.run(sweep, dict(self.eval_common, aligned=self.run_settings[base],
                                  lambdas=self.lambdas),
                      lambda d, base=base, sweep=sweep: {"num_rows": len(self.decode(
                          d, self.runner.stage_dir(base), self.lambdas, sweep))},
                      files=samples_file)
      self.retrained_names[family] = {lam: self.train_run(family, self.retrain[lam])
                                      for lam in self.lambdas}

  # ---- pairwise accuracy, eq. (14), on the held-out pairs -------------------------------------
  def pairwise(self) -> dict:
    return self.runner.run("pairwise", {"pairs": self.pair_stage_set, "lambdas": self.lambdas,
                                        "runs": self.run_settings,
                                        "target_length": self.rm_alg.target_length},
                           self.pairwise_stage)

  def pairwise_stage(self, d: str) -> dict:
    del d
    lm, mesh, rules = self.lm, self.mesh, self.rules
    rows, _ = prefs_lib.load_preference_jsonl(self.heldout_file)
    fn = pairwise.make_pair_logprob_fn([lm, lm])
    load = lambda name: components.load_lm_params(self.runner.stage_dir(name), lm, mesh, rules)
    ref = load("sft")

    def acc(other, weights):
      with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return pairwise.pairwise_accuracy_on_rows(
            fn, [ref, other], np.asarray(weights, np.float32), self.models.sft.vocab, rows,
            input_length=self.models.input_length, target_length=self.rm_alg.target_length,
            batch_size=self.ev.batch_size, where=self.heldout_file)
    out = {"sft": acc(ref, [1.0, 0.0])}
    for family, names in self.retrained_names.items():
      base = load(run_name(family, self.comparison.beta))
      out[family] = {"dera": [acc(base, [1.0 - lam, lam]) for lam in self.lambdas],
                     "retrained": [acc(load(names[lam]), [0.0, 1.0]) for lam in self.lambdas]}
    return out

  # ---- results ----------------------------------------------------------------------------
  def results(self, pw: dict, invocation_seconds: float) -> dict:
    m, t, p, ev, runner = self.models, self.training, self.pairs, self.ev, self.runner
    beta = self.comparison.beta
    fams = {}
    for family, names in self.retrained_names.items():
      fams[family] = {"dera": read_samples(runner, "dera_" + family),
                      "base": read_samples(runner, "eval_" + run_name(family, beta)),
                      "retrained": {lam: read_samples(runner, "eval_" + names[lam])
                                    for lam in self.lambdas},
                      "names": names}
    return results.build_results(
        lambdas=self.lambdas, beta=beta, sft_rows=read_samples(runner, "eval_sft"),
        families=fams, pairwise_result=pw, refs=self.eval_refs,
        judge_seed=self.comparison.judge_seed, pair_stats=self.pair_stats,
        reward_model=self.rm_result, stage_seconds=dict(runner.timings),
        stage_cpu_seconds=dict(runner.cpu_timings), invocation_seconds=invocation_seconds,
        ran=list(runner.ran),
        settings={"sft_steps": t.sft_steps, "reward_model_steps": t.reward_model_steps,
                  "pg_steps": t.pg_steps, "dpo_steps": t.dpo_steps if m.with_dpo else None,
                  "num_eval_prompts": ev.num_prompts, "num_samples": ev.num_samples,
                  "eval_split": ev.split, "task": m.sft.task, "model": describe_model(m.sft),
                  "max_new_tokens": m.max_new_tokens, "heldout_split": p.heldout_split,
                  "num_train_pair_prompts": p.num_train_prompts,
                  "num_heldout_pair_prompts": p.num_heldout_prompts})
