r"""The TL;DR-style study (DeRa paper, section 5.3 and appendix D.3: Figures 3, 6, 7), toy scale.

  python -m realign_jax.experiments.tldr_style \
      --gin_file=configs/experiments/tldr_style_tiny.gin --gin.MODEL_DIR="'D'"

Stages, each in its own subdirectory of MODEL_DIR, cached (a rerun resumes):
  sft                    SFT on the task: the reference pi_ref
  preferences            two samples of pi_ref per prompt, the one the gold
                         reward scores higher is `chosen`: training pairs from
                         the train split, held-out pairs from `heldout_split`
  reward_model           Bradley-Terry reward model (trunk from SFT) on them
  eval_sft               samples of pi_ref on the evaluation prompts
  pg_beta{B}             policy gradient on the learned reward at the base beta
  dera_pg                DeRa (pi_ref, that PG model) at every lambda, ONE call
  pg_beta{B/lam}         PG retrained at beta / lam (lam = 1: the base run)
  eval_pg_beta{...}      samples of the base and of every retrained PG model
  dpo_beta{...}, dera_dpo, eval_dpo_beta{...}   the same with DPO (Figure 7)
  pairwise               eq. (14) on the held-out pairs for every model
then writes MODEL_DIR/report.md, results.json and the PNG figures.

The gold reward, standing for summary quality, is the ROUGE-L F-measure of a
response against the reference summary of its prompt (the built-in corpus
pairs each docstring body with its human-written summary line; for TL;DR the
reference TL;DR). It is deterministic and independent of every trained model,
so it judges the policies without being the thing they optimise: PG optimises
the learned reward model, DPO the preference pairs, and the win rates are by
the gold judge (`evaluation.judges.RewardJudge`, higher ROUGE-L wins, equal
scores tie and count 1/2, the pair order randomised and swapped back).

All samples: the same prompts (the first `num_eval_prompts` of `eval_split`),
the same row seeds, temperature 1, `max_new_tokens` tokens at most; KL is the
exact sequence KL to pi_ref.
"""

from realign_jax import cli

cli.precheck(__name__)  # NOTE: before the heavy imports (see cli.py)

import dataclasses
import functools
import math
import os
import time
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np

from realign_jax import gin_utils
from realign_jax import paths
from realign_jax.data import pipeline
from realign_jax.data import preferences as prefs_lib
from realign_jax.decoding import sampler
from realign_jax.errors import UserError
from realign_jax.evaluation import judges, pairwise, text_metrics
from realign_jax.evaluation import win_rate as win_rate_lib
from realign_jax.experiments import length_reward as lr
from realign_jax.experiments import report as rep
from realign_jax.experiments import stages as stages_lib
from realign_jax.inference import components, loop
from realign_jax.inference import preferences as synth
from realign_jax.inference.methods_policy import PolicySampling
from realign_jax.models.api import LanguageModel
from realign_jax.parallel import partitioning
from realign_jax.rewards.learned import LearnedReward
from realign_jax.training import trainer as trainer_lib
from realign_jax.training.dpo import DPO
from realign_jax.training.reward_model import RewardModel
from realign_jax.training.sft import SFT

SAMPLES = "samples.jsonl"
TRAIN_PAIRS = "train.jsonl"
HELDOUT_PAIRS = "heldout.jsonl"
FAMILIES = ("pg", "dpo")
GOLD_NAME = "ROUGE-L F against the reference summary"


# ---- the gold reward ------------------------------------------------------------
def gold_scores(references: Sequence[str], responses: Sequence[str]) -> np.ndarray:
  """r*(x, y) = ROUGE-L F(y, reference(x)): [N] references, [N] responses -> [N] float64."""
  if len(references) != len(responses):
    raise UserError(f"gold reward: {len(references)} references for {len(responses)} responses")
  return np.array([text_metrics.rouge_l(y, ref) for ref, y in zip(references, responses)],
                  np.float64)


def gold_judge() -> judges.RewardJudge:
  """The judge of every win rate; its `prompts` are the prompts' reference summaries."""
  return judges.RewardJudge(gold_scores, name="rouge_l_f")


def prompt_gold_fn(examples: Sequence[dict]) -> Callable:
  """(prompt texts, responses) -> gold scores, the reference looked up by prompt text."""
  refs = {e["inputs"]: e["targets"] for e in examples}

  def fn(prompts, responses):
    missing = [p for p in prompts if p not in refs]
    if missing:
      raise UserError(f"gold reward: no reference summary for prompt {missing[0][:60]!r}")
    return gold_scores([refs[p] for p in prompts], responses)
  return fn


class JittedReward:
  """A reward whose `score_tokens` runs compiled (decode rows score outside the sampler's jit)."""

  def __init__(self, reward):
    self.reward = reward
    self.score_tokens = jax.jit(reward.score_tokens)

  def params(self):
    return self.reward.params()


# ---- stage names and settings -------------------------------------------------------
def run_name(family: str, beta: float) -> str:
  return f"{family}_beta{beta:g}"


def layout_free(settings: Any, root: str) -> Any:
  """Canonical settings with paths inside MODEL_DIR written relative to it.

  NOTE: stage outputs depend on which stage a path points to, not on where
  MODEL_DIR lives; a moved study directory still resumes.
  """
  settings = stages_lib.canonical(settings)
  if isinstance(settings, dict):
    return {k: layout_free(v, root) for k, v in settings.items()}
  if isinstance(settings, list):
    return [layout_free(v, root) for v in settings]
  if isinstance(settings, str) and paths.is_remote(root):
    # NOTE: a URI is absolute already; os.path.abspath would make it a local path.
    prefix = root.rstrip("/") + "/"
    return "<MODEL_DIR>/" + settings[len(prefix):] if settings.startswith(prefix) else settings
  prefix = os.path.abspath(root) + os.sep
  if isinstance(settings, str) and not paths.is_remote(settings) and \
      os.path.abspath(settings).startswith(prefix) and os.path.isabs(settings):
    return "<MODEL_DIR>/" + os.path.relpath(settings, root)
  return settings


@dataclasses.dataclass(frozen=True)
class PairSettings:
  """How the synthetic preference pairs are drawn."""
  train_split: str
  num_train_prompts: int
  heldout_split: str
  num_heldout_prompts: int
  seed: int
  gold: str = GOLD_NAME


def write_human_pairs(stage_dir: str, comparisons_dir: str, heldout_split: str,
                      num_train: int, num_heldout: int) -> dict:
  """The preference stage on human data: the first pairs of the TL;DR comparisons' splits.

  Writes TRAIN_PAIRS (train) and HELDOUT_PAIRS (`heldout_split`) in the
  preference schema; upstream rows that are unusable (e.g. two identical
  summaries) are skipped and counted. Fewer valid pairs than asked is a
  UserError before anything is written.
  """
  plan = []
  for split, n, fname in (("train", num_train, TRAIN_PAIRS),
                          (heldout_split, num_heldout, HELDOUT_PAIRS)):
    rows, skipped = prefs_lib.load_tldr_comparisons(comparisons_dir, split, skip_invalid=True)
    if len(rows) < n:
      raise UserError(f"{n} preference pairs asked from split {split} of the TL;DR "
                      f"comparisons in {comparisons_dir}, which holds only {len(rows)} "
                      f"valid ones")
    plan.append((split, fname, rows[:n], skipped))
  out = {}
  for split, fname, rows, skipped in plan:
    # NOTE: process 0 alone writes; the others check and count the same rows.
    path = os.path.join(stage_dir, fname)
    written = (prefs_lib.write_preference_jsonl(path, rows) if stages_lib.is_primary() else
               len([prefs_lib.validate_preference(r, where=f"row {i} written to {path}")
                    for i, r in enumerate(rows, start=1)]))
    out[split] = {"pairs": written, "skipped_invalid": skipped, "source": "tldr_comparisons"}
  return out


# ---- the study ---------------------------------------------------------------------
def tldr_style(*, model_dir: str, sft: SFT, reward_model: RewardModel, pg: Callable,
               dpo: DPO, sft_steps: int, reward_model_steps: int, pg_steps: int,
               dpo_steps: int, sft_optimizer: stages_lib.OptimizerSpec,
               reward_model_optimizer: stages_lib.OptimizerSpec,
               pg_optimizer: stages_lib.OptimizerSpec, dpo_optimizer: stages_lib.OptimizerSpec,
               trainer_config: trainer_lib.TrainerConfig = trainer_lib.TrainerConfig(),
               beta: float = 0.1,
               lambdas: Sequence[float] = (0.5, 2 / 3, 1.0, 2.0, 5.0, 10.0),
               input_length: int = 96, max_new_tokens: int = 24,
               num_train_pair_prompts: int = 512, num_heldout_pair_prompts: int = 128,
               heldout_split: str = "validation", pair_seed: int = 0,
               num_eval_prompts: int = 64, num_samples: int = 2, eval_batch_size: int = 32,
               eval_split: str = "test", eval_seed: int = 0, judge_seed: int = 0,
               with_dpo: bool = True, compilation_cache: bool = True,
               progress: bool = True, comparisons_dir: str = None) -> dict:
  """Runs (or resumes) the study in `model_dir`; returns the results dict.

  Args:
    sft, reward_model, dpo: the algorithms (their INIT_CHECKPOINT and data
      files are set here, to the SFT stage and the preference stage).
    pg: the policy-gradient class as a factory (gin `@PG`, not `@PG()`): its
      reward is the reward model this study trains, so it is built here as
      pg(reward=..., init_checkpoint=..., beta=..., task=..., input_length=...,
      max_new_tokens=...).
    input_length, max_new_tokens: prompt length and response limit of every
      sample the study draws (pairs, rollouts, evaluation).
    comparisons_dir: None: synthetic pairs (two SFT samples per prompt, the gold
      reward picks `chosen`). Else human preference data as the paper uses it:
      the TL;DR comparisons release (`tldr_comparisons`, data/tldr.py) in this
      directory; its train split (the first num_train_pair_prompts pairs) trains
      the reward model and DPO, and `heldout_split` (the first
      num_heldout_pair_prompts pairs) measures pairwise accuracy.
  """
  t_start = time.perf_counter()
  # ---- validate everything before any compute -----------------------------------
  if not model_dir:
    raise UserError("MODEL_DIR is empty")
  model_dir = paths.abspath(model_dir)
  lambdas = rep.check_lambdas(lambdas, "tldr_style.lambdas")
  if any(lam <= 0 for lam in lambdas):
    raise UserError(f"tldr_style.lambdas must all be > 0 (beta / lambda is retrained), got "
                    f"{lambdas}")
  if not (beta > 0 and math.isfinite(beta)):
    raise UserError(f"tldr_style.beta must be a finite number > 0, got {beta}")
  for name, v in (("sft_steps", sft_steps), ("reward_model_steps", reward_model_steps),
                  ("pg_steps", pg_steps), ("dpo_steps", dpo_steps),
                  ("num_train_pair_prompts", num_train_pair_prompts),
                  ("num_heldout_pair_prompts", num_heldout_pair_prompts),
                  ("num_eval_prompts", num_eval_prompts), ("num_samples", num_samples),
                  ("eval_batch_size", eval_batch_size), ("input_length", input_length),
                  ("max_new_tokens", max_new_tokens)):
    if v < 1:
      raise UserError(f"tldr_style.{name} must be >= 1, got {v}")
  if not callable(pg) or isinstance(pg, trainer_lib.Algorithm):
    raise UserError("tldr_style.pg must be the PG factory (gin: `tldr_style.pg = @PG`, "
                    "without parentheses): its reward is the reward model trained here")
  if reward_model.model.output_head != "scalar":
    raise UserError("tldr_style.reward_model needs a model with output_head 'scalar' "
                    "(e.g. RewardModel.model = @rm/LanguageModel())")
  for what, alg in (("RewardModel", reward_model), ("DPO", dpo)):
    if alg.model.config != sft.model.config:
      raise UserError(f"{what}.model must have the SFT model's config (it starts from SFT)")
    if alg.input_length != input_length:
      raise UserError(f"{what}.input_length is {alg.input_length} but tldr_style.input_length "
                      f"is {input_length}; the pairs are prompts of that length")
    if alg.target_length < max_new_tokens + 1:
      raise UserError(f"{what}.target_length is {alg.target_length}; it must be at least "
                      f"tldr_style.max_new_tokens + 1 = {max_new_tokens + 1} so sampled "
                      f"responses are not cut")
  names = {run_name("pg", beta / lam) for lam in lambdas}
  if len(names) != len(lambdas):
    raise UserError(f"tldr_style.lambdas {lambdas} give retrained betas that print alike")
  if comparisons_dir:
    # NOTE: before any compute: at full scale the pairs are needed after SFT.
    from realign_jax.data import tldr
    tldr.comparison_files(comparisons_dir)
  if compilation_cache:
    stages_lib.enable_compilation_cache(stages_lib.compilation_cache_dir(model_dir))

  retrain = {lam: beta / lam for lam in lambdas}
  extra = [lam for lam in lambdas if run_name("pg", retrain[lam]) != run_name("pg", beta)]
  per_family = 3 + 2 * len(extra)  # base run, its eval, the sweep; each extra run + eval
  total = 4 + per_family * (2 if with_dpo else 1) + 1
  runner = stages_lib.StageRunner(model_dir, total=total)
  lm = LanguageModel(sft.model.config, "lm")
  mesh, rules = partitioning.create_mesh(), partitioning.logical_axis_rules()
  # NOTE: decoding runs through the one loop: on several processes each its own
  # batches on its own devices, so the decoded params live there (one mesh on one).
  decode_mesh = loop.host_mesh()
  vocab = sft.vocab
  samp = sampler.SamplingConfig(max_new_tokens=max_new_tokens, temperature=1.0)
  ev = lr.EvalSettings(task=sft.task, split=eval_split, num_prompts=num_eval_prompts,
                       num_samples=num_samples, batch_size=eval_batch_size, seed=eval_seed,
                       input_length=input_length, max_new_tokens=max_new_tokens)
  inputs = lr.eval_inputs(ev, vocab, sft.data_dir)
  eval_refs = [e["targets"] for e in pipeline.text_examples(
      sft.task, eval_split, data_dir=sft.data_dir, limit=num_eval_prompts)]
  sft_dir = runner.stage_dir("sft")
  files = lambda result: [SAMPLES]
  free = lambda s: layout_free(s, model_dir)

  # ---- SFT ------------------------------------------------------------------------------
  sft_set = free(stages_lib.train_settings(sft, sft_steps, sft_optimizer, trainer_config))
  runner.run("sft", sft_set, lambda d: stages_lib.train_stage(
      d, sft, sft_steps, sft_optimizer, trainer_config))

  # ---- synthetic preference pairs, labelled by the gold reward -----------------------------
  pair_set = PairSettings(train_split="train", num_train_prompts=num_train_pair_prompts,
                          heldout_split=heldout_split,
                          num_heldout_prompts=num_heldout_pair_prompts, seed=pair_seed)

  if comparisons_dir:
    pair_set = {"source": "tldr_comparisons", "train_split": "train",
                "num_train_pairs": num_train_pair_prompts, "heldout_split": heldout_split,
                "num_heldout_pairs": num_heldout_pair_prompts,
                "data_dir": paths.abspath(comparisons_dir)}

  def pairs_stage(d):
    if comparisons_dir:
      return write_human_pairs(d, comparisons_dir, heldout_split, num_train_pair_prompts,
                               num_heldout_pair_prompts)
    # NOTE: the builder samples in the one loop: on several processes each its
    # own batches on its own devices (`decode_mesh`; on one process the study's
    # mesh), so its params live there, not on the global mesh.
    pair_mesh = decode_mesh
    params = components.load_lm_params(sft_dir, lm, pair_mesh, rules)
    out = {}
    for split, n, fname in (("train", num_train_pair_prompts, TRAIN_PAIRS),
                            (heldout_split, num_heldout_pair_prompts, HELDOUT_PAIRS)):
      ex = pipeline.text_examples(sft.task, split, data_dir=sft.data_dir, limit=n)
      if len(ex) < n:
        raise UserError(f"{n} preference prompts asked from split {split} of {sft.task}, "
                        f"which holds only {len(ex)}")
      with jax.set_mesh(pair_mesh), nn.logical_axis_rules(rules):
        st = synth.build_synthetic_preferences(
            lm=lm, params=params, prompts=[e["inputs"] for e in ex],
            gold_reward=prompt_gold_fn(ex), output_file=os.path.join(d, fname), sampling=samp,
            input_length=input_length, batch_size=eval_batch_size, seed=pair_seed,
            vocab_path=sft.vocab_path)
      # NOTE: prompts_here (this process's share) depends on the host count, not the data.
      out[split] = {k: v for k, v in dict(dataclasses.asdict(st), skipped=st.skipped).items()
                    if k != "prompts_here"}
    return out
  pair_stats = runner.run("preferences", {"sft": sft_set, "pairs": pair_set,
                                          "input_length": input_length, "sampling": samp},
                          pairs_stage, files=lambda r: [TRAIN_PAIRS, HELDOUT_PAIRS])
  train_file = os.path.join(runner.stage_dir("preferences"), TRAIN_PAIRS)
  heldout_file = os.path.join(runner.stage_dir("preferences"), HELDOUT_PAIRS)
  pair_stage_set = {"sft": sft_set, "pairs": pair_set}

  # ---- the reward model -------------------------------------------------------------------
  rm_alg = dataclasses.replace(reward_model, init_checkpoint=sft_dir, train_file=train_file,
                               eval_file=heldout_file)
  rm_dir = runner.stage_dir("reward_model")
  rm_set = {"pairs": pair_stage_set, "rm": free(stages_lib.train_settings(
      rm_alg, reward_model_steps, reward_model_optimizer, trainer_config))}

  def rm_stage(d):
    out = stages_lib.train_stage(d, rm_alg, reward_model_steps, reward_model_optimizer,
                                 trainer_config)
    rows, _ = prefs_lib.load_preference_jsonl(heldout_file)
    reward = LearnedReward(model_dir=d, vocab_path=rm_alg.vocab_path,
                           input_length=input_length, target_length=rm_alg.target_length,
                           batch_size=eval_batch_size)
    prompts = [r["prompt"] for r in rows]
    rc = reward.score(prompts, [r["chosen"] for r in rows])
    rr = reward.score(prompts, [r["rejected"] for r in rows])
    acc, se = rep.mean_se((rc > rr).astype(np.float64))
    out["heldout_accuracy"], out["heldout_accuracy_se"] = acc, se
    out["heldout_pairs"] = len(rows)
    return out
  rm_result = runner.run("reward_model", rm_set, rm_stage)
  learned = LearnedReward(model_dir=rm_dir, vocab_path=rm_alg.vocab_path,
                          input_length=input_length, target_length=rm_alg.target_length,
                          batch_size=eval_batch_size)
  row_reward = JittedReward(learned)

  # ---- decoding helpers -----------------------------------------------------------------
  def decode(d, policy_dir, lambdas_, desc):
    """Samples `policy_dir` (lambdas_: DeRa of pi_ref and it), scored by the gold reward."""
    if jax.process_count() > 1:
      # NOTE: each process scores its own batches: the reward's params on its devices.
      learned.setup(decode_mesh, rules)
    ref = components.load_lm_params(sft_dir, lm, decode_mesh, rules)
    pol = components.load_lm_params(policy_dir, lm, decode_mesh, rules)
    rows = loop.sample(
        PolicySampling(lm, pol, reference=ref, reward=row_reward, lambdas=lambdas_), inputs,
        vocab, num_samples=num_samples, batch_size=eval_batch_size, seed=eval_seed,
        sampling=samp, mesh=decode_mesh, rules=rules, progress=progress, desc=desc)
    gold = gold_scores([eval_refs[r["prompt_index"]] for r in rows], [r["response"] for r in rows])
    for r, g in zip(rows, gold):
      r["gold"] = float(g)
    stages_lib.write_jsonl(os.path.join(d, SAMPLES), rows)
    return rows

  def decode_policy(d, policy_dir, desc):
    rows = decode(d, policy_dir, None, desc)
    return rep.summarize_rows(rows, fields=("reward", "gold", "kl", "length"))

  def decode_sweep(d, aligned_dir, desc):
    return {"num_rows": len(decode(d, aligned_dir, lambdas, desc))}

  eval_common = {"eval": ev, "reward_model": rm_set, "gold": GOLD_NAME}
  runner.run("eval_sft", dict(eval_common, policy=sft_set),
             lambda d: decode_policy(d, sft_dir, "eval_sft"), files=files)

  # ---- aligned models: PG on the learned reward, DPO on the pairs ---------------------------
  def make_alg(family, b):
    if family == "pg":
      return pg(reward=learned, init_checkpoint=sft_dir, beta=float(b), task=sft.task,
                input_length=input_length, max_new_tokens=max_new_tokens)
    return dataclasses.replace(dpo, beta=float(b), init_checkpoint=sft_dir,
                               train_file=train_file, eval_file=heldout_file)

  fam_steps = {"pg": (pg_steps, pg_optimizer), "dpo": (dpo_steps, dpo_optimizer)}
  fam_deps = {"pg": rm_set, "dpo": pair_stage_set}
  run_settings = {}

  def train_run(family, b):
    name = run_name(family, b)
    if name in run_settings:
      return name
    alg = make_alg(family, b)
    steps, opt = fam_steps[family]
    settings = {"depends": fam_deps[family],
                family: free(stages_lib.train_settings(alg, steps, opt, trainer_config))}
    runner.run(name, settings, lambda d: stages_lib.train_stage(d, alg, steps, opt,
                                                                trainer_config))
    run_settings[name] = settings
    runner.run("eval_" + name, dict(eval_common, policy=settings),
               lambda d: decode_policy(d, runner.stage_dir(name), "eval_" + name), files=files)
    return name

  retrained_names = {}
  for family in FAMILIES if with_dpo else ("pg",):
    base = train_run(family, beta)
    runner.run("dera_" + family, dict(eval_common, aligned=run_settings[base], lambdas=lambdas),
               lambda d, base=base: decode_sweep(d, runner.stage_dir(base), "dera_" + family),
               files=files)
    retrained_names[family] = {lam: train_run(family, retrain[lam]) for lam in lambdas}

  # ---- pairwise accuracy, eq. (14), on the held-out pairs -------------------------------------
  def pairwise_stage(d):
    del d
    rows, _ = prefs_lib.load_preference_jsonl(heldout_file)
    fn = pairwise.make_pair_logprob_fn([lm, lm])
    ref = components.load_lm_params(sft_dir, lm, mesh, rules)

    def acc(other, weights):
      with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return pairwise.pairwise_accuracy_on_rows(
            fn, [ref, other], np.asarray(weights, np.float32), vocab, rows,
            input_length=input_length, target_length=rm_alg.target_length,
            batch_size=eval_batch_size, where=heldout_file)
    out = {"sft": acc(ref, [1.0, 0.0])}
    for family, names in retrained_names.items():
      base = components.load_lm_params(runner.stage_dir(run_name(family, beta)), lm, mesh, rules)
      out[family] = {"dera": [acc(base, [1.0 - lam, lam]) for lam in lambdas],
                     "retrained": [acc(components.load_lm_params(runner.stage_dir(names[lam]),
                                                               lm, mesh, rules), [0.0, 1.0])
                                   for lam in lambdas]}
    return out
  pw = runner.run("pairwise", {"pairs": pair_stage_set, "lambdas": lambdas,
                               "runs": run_settings, "target_length": rm_alg.target_length},
                  pairwise_stage)

  # ---- results and report -----------------------------------------------------------------
  read = lambda name: stages_lib.read_jsonl(os.path.join(runner.stage_dir(name), SAMPLES))
  sft_rows = read("eval_sft")
  fams = {}
  for family, names in retrained_names.items():
    fams[family] = {"dera": read("dera_" + family),
                    "base": read("eval_" + run_name(family, beta)),
                    "retrained": {lam: read("eval_" + names[lam]) for lam in lambdas},
                    "names": names}
  results = build_results(
      lambdas=lambdas, beta=beta, sft_rows=sft_rows, families=fams, pairwise_result=pw,
      refs=eval_refs, judge_seed=judge_seed, pair_stats=pair_stats, reward_model=rm_result,
      stage_seconds=dict(runner.timings), stage_cpu_seconds=dict(runner.cpu_timings),
      invocation_seconds=time.perf_counter() - t_start, ran=list(runner.ran),
      settings={"sft_steps": sft_steps, "reward_model_steps": reward_model_steps,
                "pg_steps": pg_steps, "dpo_steps": dpo_steps if with_dpo else None,
                "num_eval_prompts": num_eval_prompts, "num_samples": num_samples,
                "eval_split": eval_split, "task": sft.task, "model": lr.rep_model(sft),
                "max_new_tokens": max_new_tokens, "heldout_split": heldout_split,
                "num_train_pair_prompts": num_train_pair_prompts,
                "num_heldout_pair_prompts": num_heldout_pair_prompts})
  figures = write_figures(model_dir, results)
  return rep.write_outputs(model_dir, results, figures, render_report)


# ---- numbers ---------------------------------------------------------------------------
def _keyed(rows) -> dict:
  return {(r["prompt_index"], r["sample"]): r for r in rows}


def _win(judge, refs, rows_1, rows_2, seed: int) -> dict:
  """Gold-judge win rate of rows_1 over rows_2, paired by (prompt, sample)."""
  a, b = _keyed(rows_1), _keyed(rows_2)
  if set(a) != set(b):
    raise UserError(f"win rate: the two sides hold different (prompt, sample) rows "
                    f"({len(a)} vs {len(b)})")
  keys = sorted(a)
  return win_rate_lib.win_rate(judge, [refs[k[0]] for k in keys],
                               [a[k]["response"] for k in keys],
                               [b[k]["response"] for k in keys], seed=seed)


def family_results(lambdas, beta, sft_rows, fam, pw, refs, judge_seed) -> dict:
  """Win rates (Fig. 3 a-c / 7 a-b), rewards, KL and pairwise accuracy of one family."""
  judge = gold_judge()
  dera_by = {lam: [r for r in fam["dera"] if r["lam"] == lam] for lam in lambdas}
  for lam, rows in dera_by.items():
    if not rows:
      raise UserError(f"the DeRa sweep holds no rows at lambda {lam}")
  retr = fam["retrained"]
  out = {"retrained_beta": [beta / lam for lam in lambdas],
         "retrained_runs": [fam["names"][lam] for lam in lambdas]}

  def curve(key, fn):
    res = [fn(lam) for lam in lambdas]
    out[key] = [r["win_rate"] for r in res]
    out[key + "_se"] = [r["win_rate_se"] for r in res]
    out[key + "_counts"] = [{k: r[k] for k in ("wins", "losses", "ties", "num_judged",
                                               "num_failed")} for r in res]
  curve("dera_winrate_vs_sft", lambda lam: _win(judge, refs, dera_by[lam], sft_rows, judge_seed))
  curve("retrained_winrate_vs_sft",
        lambda lam: _win(judge, refs, retr[lam], sft_rows, judge_seed))
  curve("dera_winrate_vs_base",
        lambda lam: _win(judge, refs, dera_by[lam], fam["base"], judge_seed))
  curve("retrained_winrate_vs_base",
        lambda lam: _win(judge, refs, retr[lam], fam["base"], judge_seed))
  curve("dera_winrate_vs_retrained",
        lambda lam: _win(judge, refs, dera_by[lam], retr[lam], judge_seed))
  for prefix, by in (("dera", dera_by), ("retrained", retr)):
    summ = [rep.summarize_rows(by[lam], fields=("reward", "gold", "kl", "length"))
            for lam in lambdas]
    for f, key in (("gold", "gold"), ("reward", "learned_reward"), ("kl", "kl"),
                   ("length", "length")):
      out[f"{prefix}_{key}"] = [s[f] for s in summ]
      out[f"{prefix}_{key}_se"] = [s[f + "_se"] for s in summ]
  for prefix in ("dera", "retrained"):
    out[f"{prefix}_pairwise_accuracy"] = [p["pairwise_accuracy"] for p in pw[prefix]]
    out[f"{prefix}_pairwise_accuracy_se"] = [p["pairwise_accuracy_se"] for p in pw[prefix]]
  pairs = (("winrate_vs_sft", "dera_winrate_vs_sft", "retrained_winrate_vs_sft"),
           ("winrate_vs_base", "dera_winrate_vs_base", "retrained_winrate_vs_base"),
           ("gold", "dera_gold", "retrained_gold"),
           ("pairwise_accuracy", "dera_pairwise_accuracy", "retrained_pairwise_accuracy"),
           ("kl", "dera_kl", "retrained_kl"))
  out["pearson"] = {name: rep.pearson(out[a], out[b]) for name, a, b in pairs}
  out["pearson_ci"] = {name: rep.pearson_ci(out[a], out[b]) for name, a, b in pairs}
  out["disagreement_lambdas"] = {
      name: rep.disagreements(lambdas, out[a], out[a + "_se"], out[b], out[b + "_se"])
      for name, a, b in pairs if name != "kl"}
  # NOTE: lambda = 0 is the SFT model itself, whose win rate against itself is
  # exactly 1/2 (every pair a tie) at KL 0: with it the verdict can also say
  # that alignment gained nothing.
  for prefix, who in (("dera", "DeRa"), ("retrained", "the model retrained")):
    out[f"{prefix}_verdict"] = rep.regularisation_verdict(
        [0.0] + lambdas, [0.5] + out[f"{prefix}_winrate_vs_sft"],
        [0.0] + out[f"{prefix}_winrate_vs_sft_se"], [0.0] + out[f"{prefix}_kl"], who)
  base = summarize_base(fam["base"], sft_rows, refs, judge, judge_seed)
  out["base"] = base
  # NOTE: DeRa at lambda = 1 samples the base model with the same row seeds:
  # identical tokens are a check of the whole pipeline.
  if 1.0 in lambdas:
    a, b = _keyed(dera_by[1.0]), _keyed(fam["base"])
    out["identical_samples_fraction_lambda1"] = float(np.mean(
        [a[k]["tokens"] == b[k]["tokens"] for k in a]))
  return out


def summarize_base(base_rows, sft_rows, refs, judge, seed) -> dict:
  s = rep.summarize_rows(base_rows, fields=("reward", "gold", "kl", "length"))
  w = _win(judge, refs, base_rows, sft_rows, seed)
  s["winrate_vs_sft"], s["winrate_vs_sft_se"] = w["win_rate"], w["win_rate_se"]
  return s


def build_results(*, lambdas, beta, sft_rows, families, pairwise_result, refs, judge_seed,
                  pair_stats, reward_model, stage_seconds, invocation_seconds, ran, settings,
                  stage_cpu_seconds=None) -> dict:
  """Every number of results.json and report.md, from the decode rows and stage results."""
  lambdas = rep.check_lambdas(lambdas)
  out = {"lambdas": lambdas, "beta": beta, "gold_reward": GOLD_NAME,
         "sft": rep.summarize_rows(sft_rows, fields=("reward", "gold", "kl", "length")),
         "preference_pairs": pair_stats,
         "reward_model": {k: reward_model.get(k) for k in ("heldout_accuracy",
                                                           "heldout_accuracy_se",
                                                           "heldout_pairs", "step")},
         "sft_pairwise_accuracy": pairwise_result["sft"]["pairwise_accuracy"],
         "sft_pairwise_accuracy_se": pairwise_result["sft"]["pairwise_accuracy_se"],
         "num_heldout_pairs": pairwise_result["sft"]["num_pairs"]}
  for family, fam in families.items():
    out[family] = family_results(lambdas, beta, sft_rows, fam, pairwise_result[family], refs,
                                 judge_seed)
  pgr = out["pg"]
  # NOTE: the interface keys: the policy-gradient study (Figures 3 and 6) at top level.
  for key in ("dera_winrate_vs_sft", "retrained_winrate_vs_sft", "dera_winrate_vs_base",
              "retrained_winrate_vs_base", "dera_winrate_vs_retrained"):
    out[key], out[key + "_se"] = pgr[key], pgr[key + "_se"]
  out["pairwise_accuracy"] = {"dera": pgr["dera_pairwise_accuracy"],
                              "retrained": pgr["retrained_pairwise_accuracy"],
                              "dera_se": pgr["dera_pairwise_accuracy_se"],
                              "retrained_se": pgr["retrained_pairwise_accuracy_se"],
                              "sft": out["sft_pairwise_accuracy"]}
  out["pearson"] = pgr["pearson"]["winrate_vs_sft"]
  out["stage_seconds"] = stage_seconds
  out["total_stage_seconds"] = float(sum(v for v in stage_seconds.values() if math.isfinite(v)))
  cpu = stage_cpu_seconds or {}
  out["stage_cpu_seconds"] = {k: (v if math.isfinite(v) else None) for k, v in cpu.items()}
  out["invocation_seconds"] = invocation_seconds
  out["stages_run_now"] = ran
  out["settings"] = settings
  out["num_rows_per_lambda"] = len(sft_rows)
  return out


# ---- figures and report -------------------------------------------------------------------
_TITLES = {"pg": "policy gradient", "dpo": "DPO"}


def write_figures(model_dir: str, res: dict) -> dict:
  lam = res["lambdas"]
  figs = {}
  fig_no = {"pg": "3", "dpo": "7"}
  for family in FAMILIES:
    if family not in res:
      continue
    f = res[family]
    n, t = fig_no[family], _TITLES[family]
    curves = lambda key: {"DeRa": (f[f"dera_{key}"], f[f"dera_{key}_se"]),
                          "retrained at beta / lambda": (f[f"retrained_{key}"],
                                                         f[f"retrained_{key}_se"])}
    flat = lambda v: [v] * len(lam)  # a labelled horizontal reference line
    plot = functools.partial(rep.plot_lambda_curves, base_beta=res["beta"])
    figs[f"{family}_vs_sft"] = plot(
        os.path.join(model_dir, f"fig{n}a_{family}_winrate_vs_sft.png"), lam,
        curves("winrate_vs_sft"), ylabel="gold win rate against SFT",
        title=f"({t}) against the SFT model (Fig. {n}a)",
        lines={"base model (beta, lambda = 1)": flat(f["base"]["winrate_vs_sft"])})
    figs[f"{family}_vs_base"] = plot(
        os.path.join(model_dir, f"fig{n}b_{family}_winrate_vs_base.png"), lam,
        curves("winrate_vs_base"), ylabel="gold win rate against base",
        title=f"({t}) against the base aligned model (Fig. {n}b)",
        lines={"a tie (0.5)": flat(0.5)})
    figs[f"{family}_vs_retrained"] = plot(
        os.path.join(model_dir, f"fig{n}c_{family}_dera_vs_retrained.png"), lam,
        {"DeRa against retrained": (f["dera_winrate_vs_retrained"],
                                    f["dera_winrate_vs_retrained_se"])},
        ylabel="gold win rate", title=f"({t}) DeRa against retrained (Fig. {n}c)",
        lines={"a tie (0.5)": flat(0.5)})
    figs[f"{family}_pairwise"] = plot(
        os.path.join(model_dir, f"fig6_{family}_pairwise_accuracy.png"), lam,
        curves("pairwise_accuracy"), ylabel="pairwise accuracy (eq. 14)",
        title=f"({t}) pairwise accuracy, held-out pairs (Fig. 6)",
        lines={"SFT model": flat(res["sft_pairwise_accuracy"])})
    figs[f"{family}_kl"] = plot(
        os.path.join(model_dir, f"kl_{family}.png"), lam, curves("kl"),
        ylabel="KL(pi || pi_ref), nats", title=f"({t}) KL to the SFT model")
  return figs


def _pm(x, se) -> str:
  return f"{rep.fmt(x)} ± {rep.fmt(se)}"


def _family_section(res: dict, family: str) -> list:
  f, lam = res[family], res["lambdas"]
  t = _TITLES[family]
  fig = {"pg": "3", "dpo": "7"}[family]
  b = f["base"]
  lines = [f"## {t}: DeRa against retraining (Fig. {fig}" + (", Fig. 6)" if family == "pg"
                                                            else ")"), "",
           f"Base model: {t} at beta = {res['beta']:g} (`{f['retrained_runs'][lam.index(1.0)]}`"
           if 1.0 in lam else f"Base model: {t} at beta = {res['beta']:g}",
           ]
  lines[-1] += (f"; gold win rate against SFT {_pm(b['winrate_vs_sft'], b['winrate_vs_sft_se'])},"
                f" mean gold {rep.fmt(b['gold'])}, mean learned reward {rep.fmt(b['reward'])}, "
                f"KL {rep.fmt(b['kl'])} nats" + (")." if 1.0 in lam else "."))
  lines.append("")
  rows = []
  for i, x in enumerate(lam):
    rows.append([f"{x:g}", f"{f['retrained_beta'][i]:g}",
                 _pm(f["dera_winrate_vs_sft"][i], f["dera_winrate_vs_sft_se"][i]),
                 _pm(f["retrained_winrate_vs_sft"][i], f["retrained_winrate_vs_sft_se"][i]),
                 _pm(f["dera_winrate_vs_base"][i], f["dera_winrate_vs_base_se"][i]),
                 _pm(f["retrained_winrate_vs_base"][i], f["retrained_winrate_vs_base_se"][i]),
                 _pm(f["dera_winrate_vs_retrained"][i], f["dera_winrate_vs_retrained_se"][i]),
                 f"{rep.fmt(f['dera_kl'][i])} / {rep.fmt(f['retrained_kl'][i])}",
                 f"{rep.fmt(f['dera_gold'][i])} / {rep.fmt(f['retrained_gold'][i])}",
                 f"{rep.fmt(f['dera_learned_reward'][i])} / "
                 f"{rep.fmt(f['retrained_learned_reward'][i])}",
                 f"{rep.fmt(f['dera_pairwise_accuracy'][i])} / "
                 f"{rep.fmt(f['retrained_pairwise_accuracy'][i])}"])
  lines += [rep.markdown_table(
      ["lambda", "retrained beta", "DeRa vs SFT", "retrained vs SFT", "DeRa vs base",
       "retrained vs base", "DeRa vs retrained", "KL DeRa / retr.", "gold DeRa / retr.",
       "learned reward DeRa / retr.", "pair. acc. DeRa / retr."], rows), ""]
  p = f["pearson"]
  lines.append(f"- Pearson correlation between DeRa and the retrained models across the "
               f"{len(lam)} lambdas: win rate against SFT **{rep.fmt(p['winrate_vs_sft'])}**"
               f"{rep.ci_text(f.get('pearson_ci', {}).get('winrate_vs_sft'))}; "
               f"against the base model {rep.fmt(p['winrate_vs_base'])}; mean gold reward "
               f"{rep.fmt(p['gold'])}; pairwise accuracy {rep.fmt(p['pairwise_accuracy'])}; "
               f"KL {rep.fmt(p['kl'])} (n/a: undefined, a constant curve or one lambda).")
  for name, dis in f["disagreement_lambdas"].items():
    if dis:
      lines.append(f"- **DeRa and retraining disagree** on {name.replace('_', ' ')} "
                   f"({rep.FAMILY_TEXT}) at lambda = {', '.join(f'{x:g}' for x in dis)}.")
  if not any(f["disagreement_lambdas"].values()):
    lines.append(f"- At no lambda do DeRa and retraining differ on any of these measures "
                 f"({rep.FAMILY_TEXT}).")
  if p["winrate_vs_sft"] is not None and p["winrate_vs_sft"] < 0.9:
    lines.append("- The win-rate correlation is below 0.9: on this run DeRa is a weak proxy "
                 "for retraining.")
  dv, rv = f["dera_verdict"], f["retrained_verdict"]
  lines.append(f"- Base beta, from DeRa's win rates against SFT: **{dv['verdict']}**: "
               f"{dv['reason']}.")
  lines.append(f"- From the retrained models: **{rv['verdict']}**: {rv['reason']}.")
  if dv["verdict"] != rv["verdict"]:
    lines.append("- The two verdicts differ: DeRa and retraining disagree on this point.")
  if "identical_samples_fraction_lambda1" in f:
    lines.append(f"- Check: at lambda = 1 DeRa's samples equal the base model's token for "
                 f"token in {100 * f['identical_samples_fraction_lambda1']:.0f}% of rows (same "
                 f"row seeds; expected 100%).")
  lines.append("")
  return lines


def render_report(res: dict) -> str:
  s = res["settings"]
  lines = ["# TL;DR-style study (DeRa paper, Figures 3, 6, 7), toy scale", ""]
  tr = res["preference_pairs"].get("train", {})
  ho = res["preference_pairs"].get(s["heldout_split"], {})
  rm = res["reward_model"]
  human = tr.get("source") == "tldr_comparisons"
  lines += [
      f"Model: `{s['model']}`; task `{s['task']}`; SFT {s['sft_steps']} steps, reward model "
      f"{s['reward_model_steps']} steps, every PG run {s['pg_steps']} steps"
      + (f", every DPO run {s['dpo_steps']} steps" if s.get("dpo_steps") else "") + ".", "",
      f"**Gold reward** (standing for summary quality): the {res['gold_reward']} of the prompt "
      f"(word-level longest common subsequence, harmonic mean of precision and recall). It "
      + (f"judges every win rate; no trained model sees it directly." if human else
         f"labels the synthetic preference pairs and judges every win rate; no trained model "
         f"sees it directly."), "",
      (f"Preference pairs: human comparisons of the TL;DR release (`tldr_comparisons`): "
       f"{tr.get('pairs')} training pairs of `train` (skipped as invalid: "
       f"{tr.get('skipped_invalid')}), {ho.get('pairs')} held-out pairs of "
       f"`{s['heldout_split']}`. " if human else
       f"Preference pairs: two SFT samples per prompt, the higher gold score `chosen`: "
       f"{tr.get('pairs')} training pairs from {tr.get('prompts')} `train` prompts "
       f"(skipped: {tr.get('ties')} ties, {tr.get('identical')} identical, {tr.get('empty')} "
       f"empty), {ho.get('pairs')} held-out pairs from {ho.get('prompts')} "
       f"`{s['heldout_split']}` prompts. ") + "Bradley-Terry reward model: held-out accuracy "
      f"{_pm(rm['heldout_accuracy'], rm['heldout_accuracy_se'])} on "
      f"{rm['heldout_pairs']} pairs.", "",
      f"Evaluation: the first {s['num_eval_prompts']} prompts of `{s['eval_split']}`, "
      f"{s['num_samples']} samples each at temperature 1 ({res['num_rows_per_lambda']} "
      f"responses per model), at most {s['max_new_tokens']} tokens, the same row seeds "
      f"everywhere. Win rates by the gold judge (ties 1/2, pair order randomised), "
      f"± a standard error; KL is the exact sequence KL to the SFT model (nats); pairwise "
      f"accuracy is eq. (14) on the {res['num_heldout_pairs']} held-out pairs (SFT model: "
      f"{_pm(res['sft_pairwise_accuracy'], res['sft_pairwise_accuracy_se'])}). SFT samples: "
      f"mean gold {rep.fmt(res['sft']['gold'])}, mean learned reward "
      f"{rep.fmt(res['sft']['reward'])}.", ""]
  for family in FAMILIES:
    if family in res:
      lines += _family_section(res, family)
  lines += ["## Figures", ""]
  for name in res.get("figures", {}).values():
    lines += [f"![{name[:-4]}]({name})", ""]
  lines += ["## Time", ""]
  st, cpu = res["stage_seconds"], res.get("stage_cpu_seconds") or {}
  lines.append(rep.markdown_table(
      ["stage", "wall seconds", "CPU seconds (all threads)"],
      [[k, f"{v:.0f}", "n/a" if cpu.get(k) is None else f"{cpu[k]:.0f}"] for k, v in st.items()]))
  lines += ["", f"Sum of stage times: {res['total_stage_seconds']:.0f} s wall on "
            f"{os.cpu_count()} cores. This invocation: {res['invocation_seconds']:.0f} s wall "
            f"(stages run now: {', '.join(res['stages_run_now']) or 'none, all cached'})."]
  return "\n".join(lines) + "\n"


def main(argv: list) -> int:
  res = gin_utils.call(gin_utils.configure_binary(argv, "tldr_style", tldr_style))
  print(f"Pearson(DeRa, retrained) of the PG win rates against SFT = {rep.fmt(res['pearson'])}; "
        f"report: {res['report']}")
  print("plots: " + ", ".join(res["figure_paths"].values()))
  return 0


if __name__ == "__main__":
  gin_utils.run_main(main)
