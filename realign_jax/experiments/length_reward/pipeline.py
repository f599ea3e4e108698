"""The length-reward study's stage graph (DeRa paper, section 5.2, Figure 2).

Stages, each in its own subdirectory of MODEL_DIR, cached (a rerun resumes):
  sft                   SFT on the task (the reference pi_ref)
  eval_sft              samples of pi_ref: how often they fall in the rewarded
                        window [L_min, L_max] (must be < max_sft_in_range)
  ppo_beta{B}           PPO with the length reward at the base beta B, trained to
                        convergence: J on held-out prompts every `eval_every`
                        steps, stopped by the PPO trainer config's `stop_window`
                        rule (trainer.converged), `ppo_steps` the cap
  dera_sweep            DeRa (logit mixing of pi_ref and that PPO model) at
                        every lambda of the grid, ONE batched call
  ppo_beta{B/lam}       PPO retrained at beta / lam for each lam > 0 (lam = 1
                        is the base run itself)
  eval_ppo_beta{B/lam}  samples of each retrained model
then writes MODEL_DIR/report.md, results.json and the PNG figures.
The retrained "model" at lam = 0 (beta = infinity) is pi_ref itself.

All samples: the same prompts (the first `StudyEvaluation.num_prompts` of its
split), the same row seeds, temperature 1, the RL rollouts' length limit;
rewards are scored on the sampled tokens exactly as in training; KL is the
exact sequence KL to pi_ref (sum of per-step full-vocabulary KL). Every
`length` (rows, `*_length` in results.json, the histograms) is the response
length in tokens WITHOUT EOS, as the length reward (eq. 10) counts it and
as the frontier study's entries do.
"""

import dataclasses
import time

import numpy as np

from realign_jax.plumbing.errors import UserError
from realign_jax.experiments import report as rep
from realign_jax.experiments import stages
from realign_jax.experiments.config import StudyEvaluation, StudyOptions, check_model_dir
from realign_jax.experiments.config import describe_model
from realign_jax.experiments.length_reward import config as cfg
from realign_jax.experiments.length_reward import report, results
from realign_jax.experiments.samples import EvalSettings, PolicySampler, eval_inputs
from realign_jax.experiments.samples import read_samples, samples_file, write_samples
from realign_jax.inference import loop
from realign_jax.models.api import LanguageModel
from realign_jax.parallel import partitioning


def length_reward(*, model_dir: str, models: cfg.LengthRewardModels,
                  training: cfg.LengthRewardTraining, evaluation: StudyEvaluation,
                  comparison: cfg.LengthRewardComparison,
                  options: StudyOptions = StudyOptions()) -> dict:
  """Runs (or resumes) the study in `model_dir`; returns the results dict."""
  t_start = time.perf_counter()
  check_model_dir(model_dir)  # NOTE: every setting is checked before any compute
  cfg.check_all(models, training, evaluation, comparison)
  options.start(model_dir)
  study = _Study(model_dir, models, training, evaluation, comparison, options)
  study.run()
  res = study.results(time.perf_counter() - t_start)
  figures = report.write_figures(model_dir, res, study.dera_rows, study.retrained_rows)
  return rep.write_outputs(model_dir, res, figures, report.render_report)


class _Study:
  """The stages of one invocation, in order (`run`), and what they leave for the results."""

  def __init__(self, model_dir, models, training, evaluation, comparison, options):
    self.models, self.training, self.comparison = models, training, comparison
    self.lambdas = comparison.grid().list()
    beta = comparison.beta
    # NOTE: lam = 1 retrains at the base beta with the same seed: the base run.
    self.retrain = {lam: beta / lam for lam in self.lambdas if lam > 0}
    self.names = {lam: cfg.beta_name(b) + ("_retrained" if lam == 1.0 and
                                          comparison.retrain_at_base_beta else "")
                  for lam, b in self.retrain.items()}
    extra_runs = [lam for lam in self.retrain if self.names[lam] != cfg.beta_name(beta)]
    total = 4 + len(extra_runs) + len(self.retrain)  # sft, eval_sft, base PPO, sweep, the rest
    self.runner = stages.StageRunner(model_dir, total=total)
    ppo = models.ppo
    self.ev = EvalSettings.of(evaluation, task=ppo.task, input_length=ppo.input_length,
                              max_new_tokens=ppo.max_new_tokens)
    inputs = eval_inputs(self.ev, ppo.vocab, ppo.data_dir)
    self.sampler = PolicySampler(
        LanguageModel(models.sft.model.config, "lm"), self.runner.stage_dir("sft"), inputs,
        ppo.vocab, self.ev, ppo.sampling, ppo.reward, loop.host_mesh(),
        partitioning.logical_axis_rules(), options.progress)
    self.trained = {}  # stage name -> its train_stage result (steps, converged, evals)

  def decode_policy(self, name: str, policy_settings: dict, policy_dir: str) -> dict:
    """Stage `name`: the samples of the policy in `policy_dir`, summarised."""
    def fn(d):
      rows = self.sampler.rows(policy_dir, name)
      write_samples(d, rows)
      return rep.summarize_rows(rows)
    return self.runner.run(name, {"policy": policy_settings, "eval": self.ev,
                                  "reward": self.models.ppo.reward}, fn, files=samples_file)

  def train_ppo(self, name: str, beta: float) -> dict:
    """Stage `name`: PPO from the SFT stage at `beta`; returns its recorded settings."""
    t = self.training
    alg = dataclasses.replace(self.models.ppo, beta=float(beta),
                              init_checkpoint=self.runner.stage_dir("sft"))
    settings = {"sft": self.sft_set,
                "ppo": stages.train_settings(alg, t.ppo_steps, t.ppo_optimizer, t.ppo_trainer)}
    # NOTE: the init checkpoint's path is the stage layout, not a setting.
    settings["ppo"]["algorithm"] = dataclasses.replace(alg, init_checkpoint="<sft stage>")
    self.trained[name] = self.runner.train(name, settings, alg, t.ppo_steps, t.ppo_optimizer,
                                           t.ppo_trainer)
    return settings

  def run(self) -> None:
    t, sft, runner = self.training, self.models.sft, self.runner
    self.sft_set = stages.train_settings(sft, t.sft_steps, t.sft_optimizer, t.trainer_config)
    runner.train("sft", self.sft_set, sft, t.sft_steps, t.sft_optimizer, t.trainer_config)
    self.decode_policy("eval_sft", self.sft_set, runner.stage_dir("sft"))
    self.sft_rows = read_samples(runner, "eval_sft")
    self.check_sft_in_range()
    base = cfg.beta_name(self.comparison.beta)
    base_set = self.train_ppo(base, self.comparison.beta)

    def dera_stage(d):  # every lambda in one batched call
      rows = self.sampler.rows(runner.stage_dir(base), "dera_sweep", lambdas=self.lambdas)
      write_samples(d, rows)
      return {"num_rows": len(rows)}
    runner.run("dera_sweep", {"aligned": base_set, "eval": self.ev,
                              "reward": self.models.ppo.reward, "lambdas": self.lambdas},
               dera_stage, files=samples_file)
    for lam, b in self.retrain.items():
      name = self.names[lam]
      settings = self.train_ppo(name, b) if name != base else base_set
      self.decode_policy("eval_" + name, settings, runner.stage_dir(name))
    self.dera_rows = read_samples(runner, "dera_sweep")
    self.retrained_rows = {lam: (self.sft_rows if lam == 0.0 else read_samples(
        runner, "eval_" + self.names[lam])) for lam in self.lambdas}

  def check_sft_in_range(self) -> None:
    """The SFT samples must seldom earn the reward already (else PPO has nothing to learn)."""
    lo, hi = self.models.window
    lengths = np.array([r["length"] for r in self.sft_rows])
    self.in_range = float(np.mean((lengths >= lo) & (lengths <= hi)))
    most = self.comparison.max_sft_in_range
    if not self.in_range < most:
      raise UserError(f"SFT samples fall in the rewarded window [{lo}, {hi}] "
                      f"{100 * self.in_range:.1f}% of the time, not below {100 * most:.0f}%; "
                      f"choose another LengthReward window (the SFT stages are cached)")

  def results(self, invocation_seconds: float) -> dict:
    t, ppo, ev = self.training, self.models.ppo, self.ev
    tc = t.ppo_trainer
    runner = self.runner
    return results.build_results(
        lambdas=self.lambdas, beta=self.comparison.beta, window=self.models.window,
        dera_rows=self.dera_rows, retrained_rows=self.retrained_rows,
        sft_in_range=self.in_range, max_sft_in_range=self.comparison.max_sft_in_range,
        stage_seconds=dict(runner.timings), stage_cpu_seconds=dict(runner.cpu_timings),
        invocation_seconds=invocation_seconds, ran=list(runner.ran),
        max_new_tokens=ppo.max_new_tokens, sft_rows=self.sft_rows,
        training={lam: self.trained[self.names[lam]] for lam in self.retrain},
        settings={"sft_steps": t.sft_steps, "ppo_steps": t.ppo_steps, "ppo_convergence": {
                      "eval_every": tc.eval_every, "stop_window": tc.stop_window,
                      "metric": tc.stop_metric, "eval_prompts": ppo.max_eval_examples,
                      "max_steps": t.ppo_steps},
                  "num_eval_prompts": ev.num_prompts, "num_samples": ev.num_samples,
                  "eval_split": ev.split, "task": ppo.task,
                  "model": describe_model(self.models.sft),
                  "retrained_names": {f"{lam:g}": self.names[lam] for lam in self.retrain}})
