r"""The length-reward study (DeRa paper, section 5.2, Figure 2) end to end.

  python -m realign_jax.experiments.length_reward \
      --gin_file=configs/experiments/length_reward_tiny.gin --gin.MODEL_DIR="'D'"

Stages, each in its own subdirectory of MODEL_DIR, cached (a rerun resumes):
  sft                   SFT on the task (the reference pi_ref)
  eval_sft              samples of pi_ref: how often they fall in the rewarded
                        window [L_min, L_max] (must be < max_sft_in_range)
  ppo_beta{B}           PPO with the length reward at the base beta B, trained to
                        convergence: J on held-out prompts every `eval_every`
                        steps, stopped by `ppo_trainer_config.stop_window`'s
                        rule (trainer.converged), `ppo_steps` the cap
  dera_sweep            DeRa (logit mixing of pi_ref and that PPO model) at
                        every lambda of the grid, ONE batched call
  ppo_beta{B/lam}       PPO retrained at beta / lam for each lam > 0 (lam = 1
                        is the base run itself)
  eval_ppo_beta{B/lam}  samples of each retrained model
then writes MODEL_DIR/report.md, results.json and the PNG figures.
The retrained "model" at lam = 0 (beta = infinity) is pi_ref itself.

All samples: the same prompts (the first `num_eval_prompts` of the eval
split), the same row seeds, temperature 1, the RL rollouts' length limit;
rewards are scored on the sampled tokens exactly as in training; KL is the
exact sequence KL to pi_ref (sum of per-step full-vocabulary KL). Every
`length` (rows, `*_length` in results.json, the histograms) is the response
length in tokens WITHOUT EOS, as the length reward (eq. 10) counts it and
as the frontier study's entries do.
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
from realign_jax.data import pipeline
from realign_jax.errors import UserError
from realign_jax.evaluation import optimum as opt
from realign_jax.experiments import report as rep
from realign_jax.experiments import stages as stages_lib
from realign_jax.inference import components, loop
from realign_jax.inference.methods_policy import PolicySampling
from realign_jax.models.api import LanguageModel
from realign_jax.parallel import partitioning
from realign_jax.rewards.length import LengthReward
from realign_jax.training import trainer as trainer_lib
from realign_jax.training.ppo import PPO
from realign_jax.training.sft import SFT

SAMPLES = "samples.jsonl"


def beta_name(beta: float) -> str:
  return f"ppo_beta{beta:g}"


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """What every decode of the study shares."""
  task: str
  split: str
  num_prompts: int
  num_samples: int
  batch_size: int
  seed: int
  input_length: int
  max_new_tokens: int


def eval_inputs(ev: EvalSettings, vocab, data_dir=None) -> np.ndarray:
  """[num_prompts, input_length] ids of the first prompts of the eval split."""
  ex = pipeline.text_examples(ev.task, ev.split, data_dir=data_dir, limit=ev.num_prompts)
  if len(ex) < ev.num_prompts:
    raise UserError(f"num_eval_prompts is {ev.num_prompts} but task {ev.task} split {ev.split} "
                    f"holds only {len(ex)} examples")
  return pipeline.encode_batch(vocab, ex, input_length=ev.input_length,
                               target_length=ev.max_new_tokens)["inputs"]


def length_reward(*, model_dir: str, sft: SFT, ppo: PPO, sft_steps: int, ppo_steps: int,
                  sft_optimizer: stages_lib.OptimizerSpec,
                  ppo_optimizer: stages_lib.OptimizerSpec,
                  trainer_config: trainer_lib.TrainerConfig = trainer_lib.TrainerConfig(),
                  ppo_trainer_config: Optional[trainer_lib.TrainerConfig] = None,
                  beta: float = 0.1,
                  lambdas: Sequence[float] = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0),
                  num_eval_prompts: int = 128, num_samples: int = 2, eval_batch_size: int = 32,
                  eval_split: str = "validation", eval_seed: int = 0,
                  max_sft_in_range: float = 0.3, retrain_at_base_beta: bool = False,
                  compilation_cache: bool = True, progress: bool = True) -> dict:
  """Runs (or resumes) the study in `model_dir`; returns the results dict.

  `ppo_trainer_config` (default `trainer_config`) trains the PPO runs: with
  `eval_every` and `stop_window` each runs to convergence, `ppo_steps` steps
  at most, its curve of J on `ppo.max_eval_examples` held-out prompts kept.
  """
  t_start = time.perf_counter()
  # ---- validate everything before any compute -----------------------------------
  if not model_dir:
    raise UserError("MODEL_DIR is empty")
  lambdas = rep.check_lambdas(lambdas, "length_reward.lambdas")
  if not isinstance(ppo.reward, LengthReward):
    raise UserError(f"length_reward needs PPO.reward = @LengthReward(), got "
                    f"{type(ppo.reward).__name__}")
  if not (beta > 0 and math.isfinite(beta)):
    raise UserError(f"length_reward.beta must be a finite number > 0, got {beta}")
  for name, v in (("sft_steps", sft_steps), ("ppo_steps", ppo_steps),
                  ("num_eval_prompts", num_eval_prompts), ("num_samples", num_samples),
                  ("eval_batch_size", eval_batch_size)):
    if v < 1:
      raise UserError(f"length_reward.{name} must be >= 1, got {v}")
  if ppo.model.config != sft.model.config:
    raise UserError("SFT.model and PPO.model must be the same model config (PPO starts from SFT)")
  window = (ppo.reward.min_length, ppo.reward.max_length)
  if window[1] >= ppo.max_new_tokens:
    raise UserError(f"the rewarded window [{window[0]}, {window[1]}] must end below "
                    f"PPO.max_new_tokens = {ppo.max_new_tokens} (EOS included)")
  ppo_tc = ppo_trainer_config or trainer_config
  if ppo_tc.stop_window and not (ppo_tc.eval_every and ppo.max_eval_examples):
    raise UserError("the PPO runs' stopping rule (stop_window) needs eval_every > 0 and "
                    "PPO.max_eval_examples > 0 (the held-out prompts it evaluates J on)")
  if compilation_cache:
    stages_lib.enable_compilation_cache(stages_lib.compilation_cache_dir(model_dir))

  # NOTE: lam = 1 retrains at the base beta with the same seed: the base run.
  retrain = {lam: beta / lam for lam in lambdas if lam > 0}
  retrain_names = {lam: (beta_name(b) + ("_retrained" if lam == 1.0 and retrain_at_base_beta
                                         else "")) for lam, b in retrain.items()}
  extra_runs = [lam for lam in retrain if retrain_names[lam] != beta_name(beta)]
  total = 4 + len(extra_runs) + len(retrain)  # sft, eval_sft, base PPO, sweep, the rest
  runner = stages_lib.StageRunner(model_dir, total=total)
  ev = EvalSettings(task=ppo.task, split=eval_split, num_prompts=num_eval_prompts,
                    num_samples=num_samples, batch_size=eval_batch_size, seed=eval_seed,
                    input_length=ppo.input_length, max_new_tokens=ppo.max_new_tokens)
  inputs = eval_inputs(ev, ppo.vocab, ppo.data_dir)
  lm = LanguageModel(sft.model.config, "lm")
  mesh, rules = loop.host_mesh(), partitioning.logical_axis_rules()

  def sample(method, desc):
    return loop.sample(method, inputs, ppo.vocab, num_samples=num_samples,
                       batch_size=eval_batch_size, seed=eval_seed, sampling=ppo.sampling,
                       mesh=mesh, rules=rules, progress=progress, desc=desc)

  def decode_policy(stage_dir, policy_dir, desc):
    ref = components.load_lm_params(runner.stage_dir("sft"), lm, mesh, rules)
    pol = components.load_lm_params(policy_dir, lm, mesh, rules)
    rows = sample(PolicySampling(lm, pol, reference=ref, reward=ppo.reward), desc)
    stages_lib.write_jsonl(os.path.join(stage_dir, SAMPLES), rows)
    return rep.summarize_rows(rows)

  files = lambda result: [SAMPLES]

  # ---- SFT and its samples ------------------------------------------------------
  sft_set = stages_lib.train_settings(sft, sft_steps, sft_optimizer, trainer_config)
  runner.run("sft", sft_set, lambda d: stages_lib.train_stage(
      d, sft, sft_steps, sft_optimizer, trainer_config))
  eval_sft = runner.run("eval_sft", {"policy": sft_set, "eval": ev, "reward": ppo.reward},
                        lambda d: decode_policy(d, runner.stage_dir("sft"), "eval_sft"),
                        files=files)
  sft_rows = stages_lib.read_jsonl(os.path.join(runner.stage_dir("eval_sft"), SAMPLES))
  sft_lengths = np.array([r["length"] for r in sft_rows])
  in_range = float(np.mean((sft_lengths >= window[0]) & (sft_lengths <= window[1])))
  if not in_range < max_sft_in_range:
    raise UserError(f"SFT samples fall in the rewarded window [{window[0]}, {window[1]}] "
                    f"{100 * in_range:.1f}% of the time, not below "
                    f"{100 * max_sft_in_range:.0f}%; choose another LengthReward window (the "
                    f"SFT stages are cached)")

  # ---- PPO runs -------------------------------------------------------------------
  def ppo_at(b):
    return dataclasses.replace(ppo, beta=float(b), init_checkpoint=runner.stage_dir("sft"))

  training = {}  # stage name -> its train_stage result (steps, converged, evals)

  def train_ppo(name, b):
    alg = ppo_at(b)
    settings = {"sft": sft_set, "ppo": stages_lib.train_settings(alg, ppo_steps, ppo_optimizer,
                                                                 ppo_tc)}
    # NOTE: the init checkpoint's path is the stage layout, not a setting.
    settings["ppo"]["algorithm"] = dataclasses.replace(alg, init_checkpoint="<sft stage>")
    training[name] = runner.run(name, settings, lambda d: stages_lib.train_stage(
        d, alg, ppo_steps, ppo_optimizer, ppo_tc))
    return settings

  base_set = train_ppo(beta_name(beta), beta)

  # ---- DeRa: every lambda in one batched call ----------------------------------------
  def dera_stage(d):
    ref = components.load_lm_params(runner.stage_dir("sft"), lm, mesh, rules)
    aligned = components.load_lm_params(runner.stage_dir(beta_name(beta)), lm, mesh, rules)
    rows = sample(PolicySampling(lm, aligned, reference=ref, reward=ppo.reward,
                                 lambdas=lambdas), "dera_sweep")
    stages_lib.write_jsonl(os.path.join(d, SAMPLES), rows)
    return {"num_rows": len(rows)}
  runner.run("dera_sweep", {"aligned": base_set, "eval": ev, "reward": ppo.reward,
                            "lambdas": lambdas}, dera_stage, files=files)

  # ---- retrained at beta / lam ---------------------------------------------------------
  retrained = {0.0: eval_sft} if 0.0 in lambdas else {}
  for lam, b in retrain.items():
    name = retrain_names[lam]
    if name != beta_name(beta):
      settings = train_ppo(name, b)
    else:
      settings = base_set
    retrained[lam] = runner.run("eval_" + name, {"policy": settings, "eval": ev,
                                                 "reward": ppo.reward},
                                lambda d, name=name: decode_policy(
                                    d, runner.stage_dir(name), "eval_" + name), files=files)

  # ---- results and report ---------------------------------------------------------------
  dera_rows = stages_lib.read_jsonl(os.path.join(runner.stage_dir("dera_sweep"), SAMPLES))
  retrained_rows = {lam: (sft_rows if lam == 0.0 else stages_lib.read_jsonl(os.path.join(
      runner.stage_dir("eval_" + retrain_names[lam]), SAMPLES))) for lam in lambdas}
  wall = time.perf_counter() - t_start
  results = build_results(
      lambdas=lambdas, beta=beta, window=window, dera_rows=dera_rows,
      retrained_rows=retrained_rows, sft_in_range=in_range, max_sft_in_range=max_sft_in_range,
      stage_seconds=dict(runner.timings), stage_cpu_seconds=dict(runner.cpu_timings),
      invocation_seconds=wall, ran=list(runner.ran),
      max_new_tokens=ppo.max_new_tokens, sft_rows=sft_rows,
      training={lam: training[retrain_names[lam]] for lam in retrain},
      settings={"sft_steps": sft_steps, "ppo_steps": ppo_steps, "ppo_convergence": {
                    "eval_every": ppo_tc.eval_every, "stop_window": ppo_tc.stop_window,
                    "metric": ppo_tc.stop_metric, "eval_prompts": ppo.max_eval_examples,
                    "max_steps": ppo_steps}, "num_eval_prompts":
                num_eval_prompts, "num_samples": num_samples, "eval_split": eval_split,
                "task": ppo.task, "model": rep_model(sft), "retrained_names": {
                    f"{lam:g}": retrain_names[lam] for lam in retrain}})
  figures = write_figures(model_dir, results, dera_rows, retrained_rows)
  return rep.write_outputs(model_dir, results, figures, render_report)


def rep_model(sft: SFT) -> str:
  c = sft.model.config
  return f"{type(c).__name__}({', '.join(f'{k}={v}' for k, v in dataclasses.asdict(c).items())})"


def _by_lam(rows, lam):
  out = [r for r in rows if r["lam"] == lam]
  if not out:
    raise UserError(f"the DeRa sweep holds no rows at lambda {lam}")
  return out


# NOTE: a retrained model counts as converged when its J is within this of J*
# (or within Z standard errors of its J, whichever is larger).
CONVERGED_TOL = 0.05


def objective_rows(rows, kl_weight: float) -> tuple:
  """(mean, standard error over prompts) of J = r - kl_weight * KL per response.

  kl_weight = inf stands for lambda = 0, the SFT model itself: J = E_ref[r].
  """
  vals = [r["reward"] if math.isinf(kl_weight) else r["reward"] - kl_weight * r["kl"]
          for r in rows]
  return rep.mean_se(vals, [r["prompt_index"] for r in rows])


def optimum_kl_for_reward(p0: float, reward: float) -> float:
  """The least KL to pi_ref of any policy with mean length reward `reward` (in [-1, 0]).

  A reward in {-1, 0} with mean r means success rate q = 1 + r; the cheapest
  way to get it keeps pi_ref inside each outcome and tilts only the outcome's
  odds, so the least KL is the binary KL(q || p0) (0 when q <= p0; +inf when
  q > 0 and p0 = 0). The optimum pi*_beta' lies on this curve.
  """
  q = min(max(1.0 + reward, 0.0), 1.0)
  if q <= p0:
    return 0.0
  if p0 <= 0.0:
    return math.inf
  kl = q * math.log(q / p0)
  if q < 1.0:
    kl += (1.0 - q) * math.log((1.0 - q) / (1.0 - p0))
  return kl


def optimum_columns(lambdas, beta: float, sft_rows, dera_rows, retrained_rows) -> dict:
  """The exact KL-regularised optimum at beta / lambda next to DeRa and the retrained models.

  The length reward takes two values, {-1, 0}: pi*_{beta'} is known in closed
  form from the SFT success rate p0 (`evaluation.optimum.binary_optimum`).
  """
  rewards = sorted({float(r["reward"]) for r in sft_rows})
  if not set(rewards) <= {-1.0, 0.0}:
    raise UserError(f"the SFT samples hold rewards {rewards[:5]}; the length reward gives only "
                    f"-1 and 0")
  p0 = float(np.mean([r["reward"] == 0.0 for r in sft_rows]))
  weights = [math.inf if lam == 0 else beta / lam for lam in lambdas]
  o = opt.binary_optimum(p0, np.array(weights), r_lo=-1.0, r_hi=0.0)
  out = {"p0": p0, "base_beta": beta, "kl_weight": [None if math.isinf(w) else w
                                                     for w in weights],
         "optimum_J": [float(x) for x in o["J"]],
         "optimum_reward": [float(x) for x in o["reward"]],
         "optimum_kl": [float(x) for x in o["kl"]]}
  for prefix, get in (("dera", lambda lam: _by_lam(dera_rows, lam)),
                      ("retrained", lambda lam: retrained_rows[lam])):
    js = [objective_rows(get(lam), w) for lam, w in zip(lambdas, weights)]
    out[f"{prefix}_J"] = [j for j, _ in js]
    out[f"{prefix}_J_se"] = [se for _, se in js]
    out[f"{prefix}_J_gap"] = [js_ - j for js_, (j, _) in zip(out["optimum_J"], js)]
    # NOTE: J* - J(pi) = beta' KL(pi || pi*) for any pi (log pi*/pi_ref = r/beta' - log Z):
    # the gap in nats is the model's KL to the optimum itself (estimated as J is).
    out[f"{prefix}_kl_to_optimum"] = [None if math.isinf(w) else g / w for g, w in
                                      zip(out[f"{prefix}_J_gap"], weights)]
  tol = [max(CONVERGED_TOL, rep.Z * se) if math.isfinite(se) else CONVERGED_TOL
         for se in out["retrained_J_se"]]
  # NOTE: where a model's J falls short: the KL it spends beyond the least KL of
  # its own mean reward (spent on changes the reward does not ask for).
  for prefix, get in (("dera", lambda lam: _by_lam(dera_rows, lam)),
                      ("retrained", lambda lam: retrained_rows[lam])):
    least = [optimum_kl_for_reward(p0, float(np.mean([r["reward"] for r in get(lam)])))
             for lam in lambdas]
    out[f"{prefix}_least_kl_for_reward"] = least
    out[f"{prefix}_excess_kl"] = [float(np.mean([r["kl"] for r in get(lam)])) - k
                                  for lam, k in zip(lambdas, least)]
  out["retrained_converged_tolerance"] = tol
  out["retrained_converged"] = [bool(g <= t) for g, t in zip(out["retrained_J_gap"], tol)]
  return out


def training_columns(lambdas, training: dict) -> dict:
  """Per lambda: PPO steps taken, whether the stopping rule ended the run, the curve of J.

  None at lambda = 0 (no training) and where a stage left no result.
  """
  steps, stopped, curves = [], [], []
  for lam in lambdas:
    t = training.get(lam)
    if lam == 0 or not t:
      steps.append(None), stopped.append(None), curves.append(None)
      continue
    ev = [e for e in t.get("evals", []) if "regularised" in e]
    steps.append(int(t["step"]))
    stopped.append(bool(t.get("converged", False)))
    curves.append({"step": [int(e["step"]) for e in ev],
                   "J": [float(e["regularised"]) for e in ev],
                   "J_se": [e.get("regularised_se") for e in ev],
                   "reward": [float(e["reward"]) for e in ev],
                   "kl": [float(e["kl"]) for e in ev]})
  return {"retrained_steps": steps, "retrained_stopped_by_rule": stopped,
          "retrained_curves": curves}


def build_results(*, lambdas, beta, window, dera_rows, retrained_rows, sft_in_range,
                  max_sft_in_range, stage_seconds, invocation_seconds, ran, max_new_tokens,
                  settings, stage_cpu_seconds=None, sft_rows=None, training=None) -> dict:
  """Every number of results.json and report.md, from the decode rows.

  `sft_rows` (the SFT model's samples) default to the retrained rows at lambda = 0.
  `training` (optional): lambda -> the PPO stage's result (`stages.train_stage`:
  steps, converged, evals), for the training curves.
  """
  lambdas = rep.check_lambdas(lambdas)
  if sft_rows is None:
    if 0.0 not in retrained_rows:
      raise UserError("the optimum needs the SFT model's samples: pass sft_rows or a lambda "
                      "grid holding 0")
    sft_rows = retrained_rows[0.0]
  dera = [rep.summarize_rows(_by_lam(dera_rows, lam)) for lam in lambdas]
  retr = [rep.summarize_rows(retrained_rows[lam]) for lam in lambdas]
  col = lambda ss, f: [s[f] for s in ss]
  out = {
      "lambdas": lambdas, "beta": beta,
      "retrained_beta": [None if lam == 0 else beta / lam for lam in lambdas],
      "window": list(window), "sft_in_range_fraction": sft_in_range,
      "max_sft_in_range": max_sft_in_range, "max_new_tokens": max_new_tokens,
  }
  for prefix, ss in (("dera", dera), ("retrained", retr)):
    for f in ("reward", "kl", "log_ratio", "length"):
      key = {"log_ratio": "kl_log_ratio"}.get(f, f)
      out[f"{prefix}_{key}"] = col(ss, f)
      out[f"{prefix}_{key}_se"] = col(ss, f + "_se")
    out[f"{prefix}_in_range"] = [float(np.mean([r["reward"] == 0.0 for r in (
        _by_lam(dera_rows, lam) if prefix == "dera" else retrained_rows[lam])])) for lam in lambdas]
  out.update(optimum_columns(lambdas, beta, sft_rows, dera_rows, retrained_rows))
  if training:
    out.update(training_columns(lambdas, training))
  out["pearson"] = rep.pearson(out["dera_reward"], out["retrained_reward"])
  out["pearson_ci"] = rep.pearson_ci(out["dera_reward"], out["retrained_reward"])
  out["pearson_kl"] = rep.pearson(out["dera_kl"], out["retrained_kl"])
  out["reward_disagreement_lambdas"] = rep.disagreements(
      lambdas, out["dera_reward"], out["dera_reward_se"], out["retrained_reward"],
      out["retrained_reward_se"])
  out["dera_verdict"] = rep.regularisation_verdict(lambdas, out["dera_reward"],
                                                   out["dera_reward_se"], out["dera_kl"], "DeRa")
  out["retrained_verdict"] = rep.regularisation_verdict(
      lambdas, out["retrained_reward"], out["retrained_reward_se"], out["retrained_kl"],
      "the model retrained")
  # NOTE: DeRa at lambda = 1 samples exactly the base PPO model with the same row
  # seeds, and at lambda = 0 exactly pi_ref: identical tokens are a check of the pipeline.
  checks = {}
  for lam in (0.0, 1.0):
    if lam in lambdas and (lam == 0.0 or settings.get("retrained_names", {}).get("1") ==
                           f"ppo_beta{beta:g}"):
      a = {(r["prompt_index"], r["sample"]): r["tokens"] for r in _by_lam(dera_rows, lam)}
      b = {(r["prompt_index"], r["sample"]): r["tokens"] for r in retrained_rows[lam]}
      checks[f"{lam:g}"] = float(np.mean([a[k] == b.get(k) for k in a]))
  out["identical_samples_fraction"] = checks
  out["stage_seconds"] = stage_seconds
  out["total_stage_seconds"] = float(sum(v for v in stage_seconds.values() if math.isfinite(v)))
  cpu = stage_cpu_seconds or {}
  out["stage_cpu_seconds"] = {k: (v if math.isfinite(v) else None) for k, v in cpu.items()}
  out["total_stage_cpu_seconds"] = (float(sum(cpu.values())) if cpu and all(
      math.isfinite(v) for v in cpu.values()) else None)
  out["invocation_seconds"] = invocation_seconds
  out["stages_run_now"] = ran
  out["settings"] = settings
  out["num_rows_per_lambda"] = dera[0]["num_rows"]
  return out


def write_figures(model_dir, results, dera_rows, retrained_rows) -> dict:
  lambdas = results["lambdas"]
  beta = results["base_beta"]
  star = "exact KL-regularised optimum at beta / lambda"
  figs = {}
  figs["reward"] = rep.plot_lambda_curves(
      os.path.join(model_dir, "fig2a_reward_vs_lambda.png"), lambdas,
      {"DeRa (one aligned model)": (results["dera_reward"], results["dera_reward_se"]),
       "retrained at beta / lambda": (results["retrained_reward"],
                                      results["retrained_reward_se"])},
      ylabel="mean length reward", title="Length reward against lambda (Fig. 2a)",
      base_beta=beta, lines={star: results["optimum_reward"]})
  figs["kl"] = rep.plot_lambda_curves(
      os.path.join(model_dir, "kl_vs_lambda.png"), lambdas,
      {"DeRa": (results["dera_kl"], results["dera_kl_se"]),
       "retrained": (results["retrained_kl"], results["retrained_kl_se"])},
      ylabel="KL(pi || pi_ref), nats", title="KL to the SFT model against lambda",
      base_beta=beta, lines={star: results["optimum_kl"]})
  figs["objective"] = rep.plot_lambda_curves(
      os.path.join(model_dir, "objective_vs_lambda.png"), lambdas,
      {"DeRa": (results["dera_J"], results["dera_J_se"]),
       "retrained": (results["retrained_J"], results["retrained_J_se"])},
      ylabel="J = E[r] - (beta / lambda) KL",
      title="Regularised objective at beta / lambda (J* = its maximum)",
      base_beta=beta, lines={"J* (" + star + ")": results["optimum_J"]})
  curve = _optimum_curve(results["p0"])
  notes = [f"lambda={lam:g}" for lam in lambdas]
  figs["reward_kl"] = rep.plot_reward_kl(
      os.path.join(model_dir, "reward_vs_kl.png"), curve,
      {"DeRa (lambda)": (results["dera_kl"], results["dera_kl_se"], results["dera_reward"],
                         results["dera_reward_se"], notes),
       "retrained at beta / lambda": (results["retrained_kl"], results["retrained_kl_se"],
                                      results["retrained_reward"],
                                      results["retrained_reward_se"], notes)},
      title=f"Length reward against KL (SFT success rate p0 = {100 * results['p0']:.1f}%)",
      ylabel="mean length reward")
  # NOTE: a run without evaluations (eval_every = 0) has an empty curve: nothing to draw.
  curves = [c if c and c["J"] else None for c in results.get("retrained_curves") or []]
  if any(curves):
    figs["training"] = rep.plot_training_curves(
        os.path.join(model_dir, "ppo_training_curves.png"),
        {f"beta' = {results['kl_weight'][i]:g} (lambda = {lambdas[i]:g})":
         (c["step"], c["J"], c["J_se"], results["optimum_J"][i])
         for i, c in enumerate(curves) if c},
        title="PPO: J = E[r] - beta' KL on held-out prompts (dashed: J*)")
  window = tuple(results["window"])
  t_max = results["max_new_tokens"]
  figs["dera_hist"] = rep.plot_histograms(
      os.path.join(model_dir, "fig2b_dera_lengths.png"),
      {lam: [r["length"] for r in _by_lam(dera_rows, lam)] for lam in lambdas}, window=window,
      title="DeRa response lengths (Fig. 2b)", max_length=t_max)
  figs["retrained_hist"] = rep.plot_histograms(
      os.path.join(model_dir, "fig2c_retrained_lengths.png"),
      {lam: [r["length"] for r in retrained_rows[lam]] for lam in lambdas}, window=window,
      title="Retrained response lengths (Fig. 2c)", max_length=t_max)
  figs["length_grid"] = rep.plot_length_grid(
      os.path.join(model_dir, "lengths_by_lambda.png"), lambdas,
      {"DeRa": {lam: [r["length"] for r in _by_lam(dera_rows, lam)] for lam in lambdas},
       "retrained at beta / lambda": {lam: [r["length"] for r in retrained_rows[lam]]
                                      for lam in lambdas}},
      window=window, max_length=t_max, title="Share of responses by length")
  return figs


def _optimum_curve(p0: float) -> dict:
  """The optimal reward-against-KL curve of the length reward for SFT success rate p0."""
  o = opt.binary_optimum(p0, np.append(np.logspace(-3, 3, 121), math.inf))
  order = np.argsort(o["kl"], kind="stable")
  return {"kl": o["kl"][order], "reward": o["reward"][order]}


def _gap_words(gap: float, se: float) -> str:
  f = rep.fmt
  if gap >= 0:
    return f"{f(gap)} below J*" + ("" if not math.isfinite(se) else f" (standard error {f(se)})")
  return f"{f(-gap)} above J* (sampling noise: no policy beats J*; standard error {f(se)})"


def _excess_words(res: dict, i: int) -> str:
  f = rep.fmt
  ex = res["retrained_excess_kl"][i]
  return (f" The retrained model spends {f(res['retrained_kl'][i])} nats for mean reward "
          f"{f(res['retrained_reward'][i])}, which needs {f(res['retrained_least_kl_for_reward'][i])} "
          f"at least: {f(ex)} nats (costing {f(res['kl_weight'][i] * ex)} of J) go to changes "
          f"the reward does not ask for.")


def optimum_section(res: dict) -> list:
  """The report's comparison of every model with the exact optimum at beta / lambda."""
  f = rep.fmt
  lam = res["lambdas"]
  e_ref = res["p0"] - 1.0  # E_SFT[r] for a reward in {-1, 0}
  lines = ["## Against the exact KL-regularised optimum", "",
           f"With a reward in {{-1, 0}} the optimum of J = E[r] - beta' KL(pi || pi_SFT) is "
           f"pi* ∝ pi_SFT exp(r / beta'), known in closed form from the SFT success rate "
           f"p0 = **{100 * res['p0']:.1f}%** (the share of the SFT samples with reward 0): "
           f"J* = beta' log(p0 + (1 - p0) e^(-1/beta')). Each lambda stands for "
           f"beta' = beta / lambda (base beta = {res['base_beta']:g}; lambda = 0 is the SFT "
           f"model, beta' = inf, where J = E_SFT[r] = {f(e_ref)} is optimal). A retrained "
           f"model counts as converged when its J is within "
           f"max({CONVERGED_TOL:g}, {rep.Z:g} standard errors) of J*.", ""]
  rows = []
  for i, x in enumerate(lam):
    w = res["kl_weight"][i]
    rows.append([f"{x:g}", "inf" if w is None else f"{w:g}", f(res["optimum_J"][i]),
                 f(res["optimum_reward"][i]), f(res["optimum_kl"][i]),
                 f"{f(res['dera_J'][i])} ± {f(res['dera_J_se'][i])}",
                 f"{f(res['retrained_J'][i])} ± {f(res['retrained_J_se'][i])}",
                 "yes" if res["retrained_converged"][i] else "**no**"])
  lines += [rep.markdown_table(
      ["lambda", "beta / lambda", "J*", "E*[r]", "KL* (nats)", "DeRa J", "retrained J",
       "retrained converged"], rows), ""]
  if "retrained_kl_to_optimum" in res:
    lines += ["A model's gap is its KL to the optimum: J* - J = beta' KL(pi || pi*) for any "
              "pi, since log pi*/pi_SFT = r / beta' - log Z. KL(pi || pi*) in nats, retrained / "
              "DeRa: " + "; ".join(
                  f"lambda = {x:g}: {f(res['retrained_kl_to_optimum'][i])} / "
                  f"{f(res['dera_kl_to_optimum'][i])}"
                  for i, x in enumerate(lam) if res["kl_weight"][i] is not None) + ".", ""]
  for i, x in enumerate(lam):
    w = res["kl_weight"][i]
    if w is None:
      lines.append(f"- lambda = 0: both are the SFT model, J = E_SFT[r] = "
                   f"{f(res['retrained_J'][i])}, the optimum's limit as beta' grows.")
      continue
    lines.append(
        f"- lambda = {x:g} (beta' = {w:g}): the retrained model is "
        f"{_gap_words(res['retrained_J_gap'][i], res['retrained_J_se'][i])}, "
        f"{'within' if res['retrained_converged'][i] else 'outside'} the tolerance "
        f"{f(res['retrained_converged_tolerance'][i])}; DeRa is "
        f"{_gap_words(res['dera_J_gap'][i], res['dera_J_se'][i])}."
        + (_excess_words(res, i) if "retrained_excess_kl" in res else ""))
  trained = [i for i, w in enumerate(res["kl_weight"]) if w is not None]
  bad = [lam[i] for i in trained if not res["retrained_converged"][i]]
  if bad:
    lines += ["", f"**{len(bad)} of {len(trained)} retrained models are not at the optimum "
              f"they stand for** (lambda = {', '.join(f'{x:g}' for x in bad)}): at those "
              f"lambdas the comparison with DeRa measures the retraining's optimisation, not "
              f"the trade-off at beta / lambda."]
  elif trained:
    lines += ["", f"All {len(trained)} retrained models are within tolerance of the optimum."]
  return lines


def training_section(res: dict) -> list:
  """The report's PPO training curves: the stopping rule, steps and J per run."""
  curves = [c if c and c["J"] else None for c in res.get("retrained_curves") or []]
  if not any(curves):
    return []
  f = rep.fmt
  conv = res["settings"].get("ppo_convergence") or {}
  lines = ["## PPO training to convergence", ""]
  if conv.get("stop_window"):
    lines.append(
        f"Rule: every {conv['eval_every']} steps J = E[r] - beta' KL is evaluated on "
        f"{conv['eval_prompts']} held-out prompts (the first of the `{res['settings']['eval_split']}` "
        f"split, one sample each, a fixed seed; exact KL); a run stops when none of the last "
        f"{conv['stop_window']} evaluations improves on the best earlier one by more than that "
        f"one's standard error, and after {conv['max_steps']} steps at most (then it did not "
        f"converge by the rule).")
  else:
    lines.append(f"No stopping rule: every run trains {res['settings']['ppo_steps']} steps.")
  lines.append("")
  rows = []
  for i, c in enumerate(curves):
    if not c:
      continue
    best = int(np.argmax(c["J"]))
    rows.append([f"{res['lambdas'][i]:g}", f"{res['kl_weight'][i]:g}",
                 str(res["retrained_steps"][i]),
                 "yes" if res["retrained_stopped_by_rule"][i] else "**no** (cap)",
                 f"{f(c['J'][-1])} ± {f(c['J_se'][-1])}",
                 f"{f(c['J'][best])} (step {c['step'][best]})", f(res["optimum_J"][i]),
                 f"{f(res['retrained_J'][i])} ± {f(res['retrained_J_se'][i])}",
                 "yes" if res["retrained_converged"][i] else "**no**"])
  lines += [rep.markdown_table(
      ["lambda", "beta'", "steps", "stopped by the rule", "last training-eval J",
       "best training-eval J", "J*", "study J (final model)", "within tolerance of J*"],
      rows), "",
      "Training-eval J: the curve's points (one sample per prompt); study J: the final "
      "model's samples of the tables above.", "",
      "![J over PPO training, per beta', J* dashed](ppo_training_curves.png)", ""]
  return lines


def render_report(res: dict) -> str:
  f = rep.fmt
  lam = res["lambdas"]
  lines = ["# Length-reward study (DeRa paper, Figure 2), toy scale", ""]
  s = res["settings"]
  lines += [
      f"Model: `{s['model']}`; task `{s['task']}`; SFT {s['sft_steps']} steps, every PPO run "
      + (f"to convergence (at most {s['ppo_steps']} steps; see below)"
         if (s.get("ppo_convergence") or {}).get("stop_window") else f"{s['ppo_steps']} steps")
      + ". Evaluation: the first {s['num_eval_prompts']} prompts of the "
      f"`{s['eval_split']}` split, {s['num_samples']} samples each at temperature 1 "
      f"({res['num_rows_per_lambda']} responses per lambda and model), at most "
      f"{res['max_new_tokens']} tokens.", "",
      f"Length reward (eq. 10): 0 if {res['window'][0]} <= |y| <= {res['window'][1]} tokens, "
      f"else -1. SFT samples fall in that window **{100 * res['sft_in_range_fraction']:.1f}%** "
      f"of the time (measured in this run; required below "
      f"{100 * res['max_sft_in_range']:.0f}%).", "",
      f"Base PPO at beta = {res['beta']:g}; DeRa mixes the logits of the SFT model and that "
      f"PPO model with weight lambda, all lambdas in one batched sampling call. Retrained: PPO "
      f"from the same SFT model at beta / lambda (lambda = 0: the SFT model itself"
      + ("; lambda = 1: the base run, reused" if s["retrained_names"].get("1") ==
         f"ppo_beta{res['beta']:g}" else "") + ").", ""]
  rows = []
  for i, x in enumerate(lam):
    rb = res["retrained_beta"][i]
    rows.append([f"{x:g}", "inf" if rb is None else f"{rb:g}",
                 f"{f(res['dera_reward'][i])} ± {f(res['dera_reward_se'][i])}",
                 f"{f(res['retrained_reward'][i])} ± {f(res['retrained_reward_se'][i])}",
                 f"{f(res['dera_kl'][i])} ± {f(res['dera_kl_se'][i])}",
                 f"{f(res['retrained_kl'][i])} ± {f(res['retrained_kl_se'][i])}",
                 f"{f(res['dera_length'][i], 1)}", f"{f(res['retrained_length'][i], 1)}"])
  lines += ["## Results", "", rep.markdown_table(
      ["lambda", "retrained beta", "DeRa reward", "retrained reward", "DeRa KL (nats)",
       "retrained KL (nats)", "DeRa length", "retrained length"], rows), "",
      "Means ± standard errors (clustered by prompt). KL is the exact sequence KL to the SFT "
      "model (sum over steps of the full-vocabulary KL along the sampled responses).", ""]
  p = res["pearson"]
  lines += ["## Does DeRa track retraining?", "",
            f"- Pearson correlation of the mean rewards of DeRa and the retrained models across "
            f"the {len(lam)} lambdas: **{f(p)}**" + (" (undefined: a constant curve)"
                                                        if p is None else "")
            + rep.ci_text(res.get("pearson_ci")) + "; of their KLs: " f"{f(res['pearson_kl'])}."]
  dis = res["reward_disagreement_lambdas"]
  family = rep.FAMILY_TEXT + "; lambda = 0 and 1 are one model on both sides"
  if dis:
    lines.append(f"- **DeRa and retraining disagree** on the mean reward ({family}) at lambda = "
                 f"{', '.join(f'{x:g}' for x in dis)}.")
  else:
    compared = rep.comparisons(lam, res["dera_reward"], res["dera_reward_se"],
                               res["retrained_reward"], res["retrained_reward_se"])
    lines.append(f"- At no lambda do the mean rewards of DeRa and retraining differ ({family})."
                 if compared else "- No lambda compares DeRa with a separately retrained model "
                 "(at lambda = 0 and 1 they are one model), so nothing is called.")
  if p is not None and p < 0.9:
    lines.append("- The correlation is below 0.9: on this run DeRa is a weak proxy for "
                 "retraining.")
  for k, v in res["identical_samples_fraction"].items():
    lines.append(f"- Check: at lambda = {k}, DeRa's samples equal the "
                 f"{'SFT' if k == '0' else 'base PPO'} model's token for token in "
                 f"{100 * v:.0f}% of rows (same row seeds; expected 100%).")
  lines += ["", *optimum_section(res)]
  lines += ["", *training_section(res)]
  lines += ["", "## Is the base beta over- or under-regularised?", ""]
  dv, rv = res["dera_verdict"], res["retrained_verdict"]
  lines.append(f"- From DeRa's reward curve: **{dv['verdict']}**: {dv['reason']}.")
  lines.append(f"- From the retrained models: **{rv['verdict']}**: {rv['reason']}.")
  if dv["verdict"] != rv["verdict"]:
    lines.append("- The two verdicts differ: DeRa and retraining disagree on this point.")
  lines += ["", "## Figures", "",
            "![reward against lambda](fig2a_reward_vs_lambda.png)", "",
            "![KL against lambda](kl_vs_lambda.png)", "",
            "![reward against KL with the optimum](reward_vs_kl.png)", "",
            "![regularised objective against lambda](objective_vs_lambda.png)", "",
            "![DeRa lengths](fig2b_dera_lengths.png)", "",
            "![retrained lengths](fig2c_retrained_lengths.png)", "",
            "![lengths, DeRa and retrained side by side](lengths_by_lambda.png)", "",
            "## Time", ""]
  st, cpu = res["stage_seconds"], res.get("stage_cpu_seconds") or {}
  lines.append(rep.markdown_table(
      ["stage", "wall seconds", "CPU seconds (all threads)"],
      [[k, f"{v:.0f}", "n/a" if cpu.get(k) is None else f"{cpu[k]:.0f}"] for k, v in st.items()]))
  tc = res.get("total_stage_cpu_seconds")
  lines += ["", f"Sum of stage times: {res['total_stage_seconds']:.0f} s wall"
            + ("" if tc is None else f", {tc:.0f} s CPU") + f" on {os.cpu_count()} cores. "
            "This invocation: "
            f"{res['invocation_seconds']:.0f} s wall (stages run now: "
            f"{', '.join(res['stages_run_now']) or 'none, all cached'})."]
  return "\n".join(lines) + "\n"


def main(argv: list) -> int:
  res = gin_utils.call(gin_utils.configure_binary(argv, "length_reward", length_reward))
  print(f"Pearson(DeRa, retrained) = {rep.fmt(res['pearson'])}; report: {res['report']}")
  print("plots: " + ", ".join(res["figure_paths"].values()))
  return 0


if __name__ == "__main__":
  gin_utils.run_main(main)
