"""The studies: stage machinery, results and report from fake stage outputs, configs, a smoke run."""

import glob
import dataclasses
import json
import math
import os

import gin
import numpy as np
import pytest

from realign_jax.plumbing import gin_utils
from realign_jax.plumbing.errors import UserError
from realign_jax.evaluation import optimum as opt
from realign_jax.decoding.lambda_grid import LambdaGrid
from realign_jax.experiments import report as rep
from realign_jax.experiments import stages as stages_lib
from realign_jax.experiments.length_reward import config as lr_config
from realign_jax.experiments.length_reward import report as lr_report
from realign_jax.experiments.length_reward import results as lr_results
from realign_jax.experiments.length_reward.__main__ import main as lr_main
from realign_jax.models.api import count_params
from realign_jax.rewards.length import LengthReward
from realign_jax.training import trainer as trainer_lib
from realign_jax.training.ppo import PPO
from realign_jax.training.sft import SFT

from tests.conftest import REPO_ROOT

LR_GIN = "configs/experiments/length_reward_tiny.gin"


@pytest.fixture
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


# ---- stage machinery ------------------------------------------------------------------
class _Counter:
  def __init__(self):
    self.calls = 0

  def __call__(self, stage_dir):
    self.calls += 1
    with open(os.path.join(stage_dir, "out.txt"), "w") as f:
      f.write(str(self.calls))
    return {"value": 7, "calls": self.calls}


def _files(result):
  del result
  return ["out.txt"]


def test_finished_stage_is_skipped_and_its_result_returned(tmp_path):
  fn = _Counter()
  r1 = stages_lib.StageRunner(str(tmp_path), log=lambda s: None)
  assert r1.run("a", {"x": 1}, fn, files=_files) == {"value": 7, "calls": 1}
  assert r1.ran == ["a"]
  r2 = stages_lib.StageRunner(str(tmp_path), log=lambda s: None)
  assert r2.run("a", {"x": 1}, fn, files=_files) == {"value": 7, "calls": 1}
  assert fn.calls == 1 and r2.ran == [] and r2.timings["a"] >= 0


@pytest.mark.parametrize("damage", ["truncated_marker", "no_marker", "missing_output",
                                    "wrong_name"])
def test_corrupted_or_partial_stage_is_redone(tmp_path, damage):
  fn = _Counter()
  runner = stages_lib.StageRunner(str(tmp_path), log=lambda s: None)
  runner.run("a", {"x": 1}, fn, files=_files)
  marker = tmp_path / "a" / stages_lib.STAGE_JSON
  if damage == "truncated_marker":
    marker.write_text(marker.read_text()[:20])
  elif damage == "no_marker":
    marker.unlink()  # killed before the stage finished
  elif damage == "missing_output":
    (tmp_path / "a" / "out.txt").unlink()
  else:
    doc = json.loads(marker.read_text())
    doc["name"] = "b"
    marker.write_text(json.dumps(doc))
  again = stages_lib.StageRunner(str(tmp_path), log=lambda s: None)
  assert again.run("a", {"x": 1}, fn, files=_files)["calls"] == 2
  assert fn.calls == 2 and again.ran == ["a"]
  # ... and the redone stage is whole again.
  assert stages_lib.StageRunner(str(tmp_path), log=lambda s: None).is_done("a", {"x": 1})


def test_changed_settings_are_refused_naming_the_field(tmp_path):
  runner = stages_lib.StageRunner(str(tmp_path), log=lambda s: None)
  settings = {"ppo": PPO(model=SFT(model=_lm()).model, reward=LengthReward(3, 5), beta=0.1)}
  runner.run("a", settings, _Counter(), files=_files)
  changed = {"ppo": PPO(model=SFT(model=_lm()).model, reward=LengthReward(3, 6), beta=0.1)}
  with pytest.raises(UserError, match=r"ppo\.reward\.max_length: 5 then, 6 now"):
    stages_lib.StageRunner(str(tmp_path), log=lambda s: None).run("a", changed, _Counter())


def test_canonical_settings():
  c = stages_lib.canonical({"t": (1, 2.5), "inf": math.inf, "obj": object})
  assert c["t"] == [1, 2.5] and c["inf"] == "inf" and isinstance(c["obj"], str)
  ppo = stages_lib.canonical(PPO(model=_lm(), reward=LengthReward(3, 5), beta=0.2))
  assert ppo["__type__"] == "PPO" and ppo["beta"] == 0.2
  assert ppo["reward"] == {"__type__": "LengthReward", "min_length": 3, "max_length": 5,
                           "unit": "tokens", "vocab_path": None, "name": "length"}
  assert json.loads(json.dumps(ppo)) == ppo
  # Adam's eps came after stages were cached: recorded only away from its default, so an
  # optimizer recorded before it still matches.
  spec = stages_lib.OptimizerSpec(name="adamw", learning_rate=3e-4)
  assert stages_lib.canonical(spec) == {
      "__type__": "OptimizerSpec", "name": "adamw", "learning_rate": 3e-4,
      "schedule": "constant", "warmup_steps": 0, "weight_decay": 0.0, "grad_clip_norm": 1.0}
  assert stages_lib.canonical(dataclasses.replace(spec, eps=1e-4))["eps"] == 1e-4


def _lm():
  from realign_jax.models.api import LanguageModel
  from tests.helpers import TINY_BUILTIN
  return LanguageModel(TINY_BUILTIN["t5"])


# ---- numbers and report from fake stage outputs ------------------------------------------
def test_pearson_by_hand():
  # x = (0, 1, 2), y = (1, 3, 2): dx = (-1, 0, 1), dy = (-1, 1, 0); r = 1 / sqrt(2 * 2).
  assert rep.pearson([0, 1, 2], [1, 3, 2]) == pytest.approx(0.5, abs=1e-12)
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=6), rng.normal(size=6)
  assert rep.pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
  assert rep.pearson(x, 3 * x + 1) == pytest.approx(1.0)
  assert rep.pearson([1, 1, 1], [1, 2, 3]) is None and rep.pearson([1], [2]) is None


def test_pearson_interval_is_fishers_z():
  # Fisher: atanh(r) +- z_{0.975} / sqrt(K - 3), mapped back through tanh.
  x = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
  y = [0.1, 0.8, 2.5, 2.9, 4.4, 4.6]
  r = rep.pearson(x, y)
  half = 1.959963984540054 / math.sqrt(len(x) - 3)
  lo, hi = rep.pearson_ci(x, y)
  assert lo == pytest.approx(math.tanh(math.atanh(r) - half), abs=1e-9)
  assert hi == pytest.approx(math.tanh(math.atanh(r) + half), abs=1e-9)
  assert lo < r < hi
  assert rep.pearson_ci(x[:3], y[:3]) is None  # K - 3 = 0: no interval
  assert rep.pearson_ci([1, 1, 1, 1], [1, 2, 3, 4]) is None


def test_disagreements_hold_the_family_wise_level():
  # Four lambdas, each 2.2 standard errors of the difference apart (p = 0.0278 each): one
  # comparison alone would be called (p < ALPHA = 0.0455), but Holm's first threshold is
  # ALPHA / 4 = 0.0114, so none is.
  se = 1.0 / math.sqrt(2.0)  # sqrt(se^2 + se^2) = 1
  lams = [0.5, 2.0, 4.0, 8.0]
  assert rep.disagreements(lams, [2.2] * 4, [se] * 4, [0.0] * 4, [se] * 4) == []
  assert rep.disagreements([2.0], [2.2], [se], [0.0], [se]) == [2.0]
  # A clear one (p = 1e-6 < ALPHA / 4) is called; then 2.2 sd meets ALPHA / 3? no (0.0152).
  assert rep.disagreements(lams, [5.0, 2.2, 2.2, 2.2], [se] * 4, [0.0] * 4, [se] * 4) == [0.5]
  # Holm steps down: p = (1e-6, 1e-6, 1e-6, 0.0278) against ALPHA / (4, 3, 2, 1).
  assert rep.disagreements(lams, [5.0, 5.0, 5.0, 2.2], [se] * 4, [0.0] * 4,
                           [se] * 4) == lams
  # A NaN mean has no p-value: never called, and it does not count in the family.
  assert rep.disagreements([0.5, 2.0], [math.nan, 2.2], [se] * 2, [1.0, 0.0], [se] * 2) == [2.0]
  assert [lam for _, lam in rep.comparisons([0.5, 2.0], [math.nan, 2.2], [se] * 2, [1.0, 0.0],
                                            [se] * 2)] == [2.0]
  # lambda = 0 and 1 are one model on both sides: not comparisons, so they cost nothing.
  assert rep.disagreements([0.0, 1.0, 2.0], [0.3, 0.5, 2.2], [se] * 3, [0.3, 0.5, 0.0],
                           [se] * 3) == [2.0]


@pytest.mark.parametrize("grid,match", [([0.0, 1.0, 1.0], "duplicates"),
                                        ([0.0, math.inf], "non-finite"),
                                        ([0.0, math.nan], "non-finite"),
                                        ([1.0, -0.5], "must all be >= 0"), ([], "empty"),
                                        ("0.5", "must be a list of numbers"),
                                        ([0.5, "1"], "non-numeric")])
def test_bad_lambda_grid(grid, match):
  with pytest.raises(UserError, match=match):
    LambdaGrid.of(grid, minimum=0.0)


def test_lambda_grid_keeps_order_and_bounds():
  grid = LambdaGrid.of([2, 0.5, np.float32(1.0)], "DeRa.lambdas")
  assert grid.list() == [2.0, 0.5, 1.0] and 0.5 in grid and len(grid) == 3
  assert LambdaGrid.of(grid, "again") == grid
  assert LambdaGrid.of([-1.0, 0.5]).list() == [-1.0, 0.5]  # DeRa extrapolates below 0
  with pytest.raises(UserError, match=r"TldrComparison.lambdas must all be > 0 \(beta / lambda "
                                      r"is retrained\), got \[0.0, 1.0\]"):
    LambdaGrid.of([0.0, 1.0], "TldrComparison.lambdas", minimum=0.0, inclusive=False,
                  why="beta / lambda is retrained")
  with pytest.raises(UserError, match="evaluate.lambdas has duplicates: \\[0.5\\]"):
    LambdaGrid.of([0.5, 0.5], "evaluate.lambdas")


def _fake_rows(lambdas, rewards_by_lam, n_prompts=4, samples=2, seed=0):
  """Rows with rewards in {0, -1} whose per-lambda mean is exactly the given value."""
  rng = np.random.default_rng(seed)
  rows = []
  for lam, mean in zip(lambdas, rewards_by_lam):
    n = n_prompts * samples
    hits = int(round((1 + mean) * n))  # reward 0 on `hits` rows, -1 on the rest
    flags = np.array([1] * hits + [0] * (n - hits))
    rng.shuffle(flags)
    for i in range(n):
      length = 5 if flags[i] else 12
      rows.append({"prompt_index": i // samples, "sample": i % samples, "lam": lam,
                   "tokens": [7] * length + [1], "length": length,
                   "reward": 0.0 if flags[i] else -1.0, "kl": 0.5 * lam + 0.01 * i,
                   "log_ratio": 0.5 * lam, "response": "x " * length})
  return rows


def _fake_results(tmp_path, dera_means, retrained_means, lambdas=(0.0, 0.5, 1.0, 2.0)):
  lambdas = list(lambdas)
  dera_rows = _fake_rows(lambdas, dera_means)
  retr_rows = _fake_rows(lambdas, retrained_means, seed=1)
  by_lam = {lam: [dict(r, lam=None) for r in retr_rows if r["lam"] == lam] for lam in lambdas}
  by_lam[0.0] = [dict(r) for r in dera_rows if r["lam"] == 0.0]  # the reference itself
  by_lam[1.0] = [dict(r) for r in dera_rows if r["lam"] == 1.0]  # the base run itself
  res = lr_results.build_results(
      lambdas=lambdas, beta=0.1, window=(3, 6), dera_rows=dera_rows, retrained_rows=by_lam,
      sft_in_range=0.125, max_sft_in_range=0.3, stage_seconds={"sft": 3.0, "ppo": 4.0},
      invocation_seconds=9.0, ran=["ppo"], max_new_tokens=16,
      settings={"sft_steps": 1, "ppo_steps": 1, "num_eval_prompts": 4, "num_samples": 2,
                "eval_split": "validation", "task": "t", "model": "m",
                "retrained_names": {"0.5": "ppo_beta0.2", "1": "ppo_beta0.1",
                                    "2": "ppo_beta0.05"}})
  return res, dera_rows, by_lam


def test_results_and_report_from_fake_stage_outputs(tmp_path):
  dera = [-1.0, -0.75, -0.5, -0.25]
  retrained = [-1.0, -0.875, -0.5, -0.125]
  res, dera_rows, by_lam = _fake_results(tmp_path, dera, retrained)
  assert res["lambdas"] == [0.0, 0.5, 1.0, 2.0]
  assert res["dera_reward"] == pytest.approx(dera)
  # lambda 0 and 1 are the reference and the base run: the same rows as DeRa's.
  assert res["retrained_reward"] == pytest.approx([-1.0, -0.875, -0.5, -0.125])
  assert res["pearson"] == pytest.approx(np.corrcoef(dera, res["retrained_reward"])[0, 1])
  assert res["dera_kl"] == pytest.approx([0.5 * lam + 0.035 for lam in res["lambdas"]])
  assert res["retrained_beta"] == [None, 0.2, 0.1, 0.05]
  assert res["identical_samples_fraction"] == {"0": 1.0, "1": 1.0}
  assert res["dera_in_range"] == pytest.approx([1 + m for m in dera])
  # standard errors are per prompt: 4 prompts of 2 samples.
  lam05 = [r["reward"] for r in dera_rows if r["lam"] == 0.5]
  per_prompt = np.array(lam05).reshape(4, 2).mean(1)
  assert res["dera_reward_se"][1] == pytest.approx(per_prompt.std(ddof=1) / 2)
  figs = lr_report.write_figures(str(tmp_path), res, dera_rows, by_lam)
  for path in figs.values():
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  text = lr_report.render_report(res)
  assert f"**{res['pearson']:.3f}**" in text
  assert "12.5%" in text and "fig2a_reward_vs_lambda.png" in text
  for lam, kl in zip(res["lambdas"], res["dera_kl"]):
    assert f"{kl:.3f}" in text


def _even_rows(lam, hits_per_prompt, kl, n_prompts=4, samples=8):
  """Every prompt with the same number of reward-0 rows: per-prompt means equal (se 0)."""
  return [{"prompt_index": p, "sample": j, "lam": lam, "tokens": [7] * (5 if j < hits_per_prompt
                                                                          else 12) + [1],
           "length": 5 if j < hits_per_prompt else 12,
           "reward": 0.0 if j < hits_per_prompt else -1.0, "kl": kl, "log_ratio": kl,
           "response": "x"} for p in range(n_prompts) for j in range(samples)]


def test_results_against_the_exact_optimum(tmp_path):
  # SFT: 1 of 8 samples per prompt in the window, p0 = 12.5% (the run).
  lambdas = [0.0, 0.5, 1.0, 2.0]
  retr = {0.0: _even_rows(0.0, 1, 0.0),
          0.5: _even_rows(None, 8, 2.5),   # J = 0 - 0.2 * 2.5 = -0.5 vs J* = -0.407
          1.0: _even_rows(1.0, 4, 1.0),    # J = -0.5 - 0.1 = -0.6 vs J* = -0.208
          2.0: _even_rows(None, 8, 2.2)}   # J = -0.11 vs J* = -0.104: converged
  dera = [dict(r, lam=lam) for lam, h, k in ((0.0, 1, 0.0), (0.5, 2, 0.3), (1.0, 4, 1.0),
                                             (2.0, 6, 1.5)) for r in _even_rows(lam, h, k)]
  res = lr_results.build_results(
      lambdas=lambdas, beta=0.1, window=(3, 6), dera_rows=dera, retrained_rows=retr,
      sft_in_range=0.125, max_sft_in_range=0.3, stage_seconds={"sft": 1.0},
      invocation_seconds=1.0, ran=[], max_new_tokens=16,
      settings={"sft_steps": 1, "ppo_steps": 1, "num_eval_prompts": 4, "num_samples": 8,
                "eval_split": "validation", "task": "t", "model": "m",
                "retrained_names": {"0.5": "ppo_beta0.2", "1": "ppo_beta0.1",
                                    "2": "ppo_beta0.05"}})
  assert res["p0"] == 0.125 and res["base_beta"] == 0.1
  # the figures: J* = -0.41 at beta 0.2, -0.21 at 0.1, -0.10 at 0.05; E_ref[r] at 0
  assert res["optimum_J"] == pytest.approx([-0.875, -0.4067, -0.2079, -0.1040], abs=1e-4)
  assert res["optimum_kl"][0] == 0.0 and res["optimum_reward"][0] == -0.875
  assert res["retrained_J"] == pytest.approx([-0.875, -0.5, -0.6, -0.11])
  # DeRa at lambda = 2 stands for beta = 0.05: -0.25 - 0.05 * 1.5
  assert res["dera_J"] == pytest.approx([-0.875, -0.75 - 0.2 * 0.3, -0.6, -0.25 - 0.075])
  assert res["retrained_converged"] == [True, False, False, True]
  # KL(pi || pi*) from its definition: the lambda = 0.5 model always earns 0 and spends 2.5
  # nats, so E[log pi/pi_ref] - E[r]/beta' + log Z with Z = p0 + (1 - p0) e^(-1/0.2).
  z = 0.125 + 0.875 * math.exp(-5.0)
  assert res["retrained_kl_to_optimum"][1] == pytest.approx(2.5 + math.log(z), abs=1e-9)
  assert res["retrained_kl_to_optimum"][0] is None and res["dera_kl_to_optimum"][0] is None
  for key in ("lambdas", "dera_reward", "retrained_reward", "dera_kl", "pearson"):
    assert key in res
  for key in ("optimum_J", "optimum_reward", "optimum_kl", "dera_J", "retrained_J",
              "retrained_converged"):
    assert len(res[key]) == len(lambdas)
  text = lr_report.render_report(res)
  assert "p0 = **12.5%**" in text and "**2 of 3 retrained models are not at the optimum" in text
  assert "lambda = 0.5 (beta' = 0.2): the retrained model is 0.093 below J*" in text
  # J's shortfall traced to KL beyond the least KL of the model's own reward:
  # reward 0 needs log 8 nats, the model at lambda 0.5 spends 2.5
  assert res["retrained_least_kl_for_reward"][1] == pytest.approx(np.log(8.0))
  assert res["retrained_excess_kl"][1] == pytest.approx(2.5 - np.log(8.0))
  assert "spends 2.500 nats for mean reward 0.000, which needs 2.079 at least" in text
  figs = lr_report.write_figures(str(tmp_path), res, dera, retr)
  assert set(figs) >= {"reward", "kl", "objective", "reward_kl", "length_grid"}
  for path in figs.values():
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  # a reward the length study cannot have is refused, naming the values
  bad = {**retr, 0.0: [dict(r, reward=0.5) for r in retr[0.0]]}
  with pytest.raises(UserError, match="only -1 and 0"):
    lr_results.optimum_columns(lambdas, 0.1, bad[0.0], dera, bad)


def test_least_kl_for_a_reward_is_the_optimum_curve():
  # pi*_beta spends exactly the least KL of its own mean reward, at every beta
  for beta in (0.4, 0.1, 0.025):
    o = opt.binary_optimum(0.125, beta)
    assert lr_results.optimum_kl_for_reward(0.125, o["reward"]) == pytest.approx(o["kl"], rel=1e-9)
  assert lr_results.optimum_kl_for_reward(0.125, 0.0) == pytest.approx(np.log(8.0))
  assert lr_results.optimum_kl_for_reward(0.125, -0.9) == 0.0  # below pi_ref's reward: free
  assert lr_results.optimum_kl_for_reward(0.0, -0.5) == float("inf")


def test_disagreement_is_reported(tmp_path):
  # Retraining gains nothing beyond lambda = 1 where DeRa gains everything.
  res, _, _ = _fake_results(tmp_path, [-1.0, -0.75, -0.5, 0.0], [-1.0, -0.75, -0.5, -1.0])
  assert res["reward_disagreement_lambdas"] == [2.0]
  text = lr_report.render_report(res)
  assert "**DeRa and retraining disagree**" in text and "lambda = 2" in text


def test_regularisation_verdicts():
  lam = [0.0, 0.5, 1.0, 2.0]
  se = [0.01] * 4
  kl = [0.0, 1.0, 2.0, 4.0]
  over = rep.regularisation_verdict(lam, [-1.0, -0.6, -0.5, -0.2], se, kl)
  assert over["verdict"] == "over-regularised" and over["lambda"] == 2.0
  under = rep.regularisation_verdict(lam, [-1.0, -0.5, -0.5, -0.5], se, kl)
  assert under["verdict"] == "under-regularised" and under["lambda"] == 0.5
  right = rep.regularisation_verdict(lam, [-1.0, -0.8, -0.5, -0.49], se, kl)
  assert right["verdict"] == "about right"
  none = rep.regularisation_verdict(lam, [-1.0, -1.0, -0.99, -0.5], se, kl)
  assert none["verdict"] == "no alignment gain"
  assert rep.regularisation_verdict([0.0, 2.0], [0, 0], [0, 0], [0, 0])["verdict"] == \
      "undetermined"


# ---- configs ----------------------------------------------------------------------------
def _experiment_configs():
  return sorted(os.path.relpath(p, REPO_ROOT)
                for p in glob.glob(os.path.join(REPO_ROOT, "configs", "experiments", "*.gin")))


def _required(path):
  names = []
  for line in open(os.path.join(REPO_ROOT, path)):
    if "%gin.REQUIRED" in line and not line.lstrip().startswith("#"):
      names.append(line.split("=")[0].strip())
  return names


@pytest.mark.parametrize("path", _experiment_configs())
def test_every_experiment_config_parses_and_builds(path, clean_gin, tmp_path):
  required = _required(path)
  gin_utils.parse([path], [f"{n} = '{tmp_path / n}'" for n in required])
  binary = next(b for b in ("length_reward", "tldr_style", "frontier") if gin.get_bindings(b))
  built = gin.get_bindings(binary)  # evaluates every @Configurable() it references
  assert built["model_dir"] == str(tmp_path / "MODEL_DIR")
  models = built["models"]
  assert isinstance(models.sft, SFT)
  grid = built["methods"] if binary == "frontier" else built["comparison"]
  LambdaGrid.of(grid.lambdas, minimum=0.0)
  built["evaluation"].check()
  if binary == "frontier":
    assert grid.aligned_beta in grid.betas
    assert isinstance(models.ppo, PPO) and models.ppo.kl_target is None
    from realign_jax.experiments.frontier import config as fr_config
    fr_config.check_all(models, built["training"], grid, built["evaluation"])
  # every algorithm and optimizer of every group builds
  values = [getattr(g, f.name) for g in built.values() if dataclasses.is_dataclass(g)
            for f in dataclasses.fields(g)]
  assert any(isinstance(v, stages_lib.OptimizerSpec) for v in values)
  for value in values:
    if isinstance(value, trainer_lib.Algorithm):
      abstract, _ = value.abstract_init()
      assert count_params(abstract) > 0
    if isinstance(value, stages_lib.OptimizerSpec):
      value.build(10)
  if binary == "length_reward":
    assert isinstance(models.ppo, PPO) and isinstance(models.ppo.reward, LengthReward)
    assert models.ppo.reward.max_length < models.ppo.max_new_tokens
    lr_config.check_all(models, built["training"], built["evaluation"], grid)
  if required:
    with pytest.raises(UserError, match=required[0]):
      gin_utils.parse([path], [])


# ---- end to end -------------------------------------------------------------------------
SMOKE = [
    "T5Config.d_model = 32", "T5Config.num_heads = 2", "T5Config.head_dim = 16",
    "T5Config.d_ff = 64", "T5Config.num_encoder_layers = 1", "T5Config.num_decoder_layers = 1",
    "SFT_STEPS = 2", "PPO_STEPS = 1", "LAMBDAS = [0.0, 1.0]",
    "SFT.batch_size = 8", "SFT.input_length = 32", "SFT.target_length = 8",
    "PPO.batch_size = 8", "PPO.input_length = 32", "PPO.max_new_tokens = 8",
    "PPO.num_epochs = 1", "PPO.num_minibatches = 1",
    "LengthReward.min_length = 2", "LengthReward.max_length = 5",
    "StudyEvaluation.num_prompts = 6", "StudyEvaluation.num_samples = 2",
    "StudyEvaluation.batch_size = 4", "LengthRewardComparison.max_sft_in_range = 1.0",
    "StudyOptions.compilation_cache = False", "StudyOptions.progress = False",
    "TrainerConfig.progress = False", "PPO.max_eval_examples = 4",
    "ppo/TrainerConfig.eval_every = 1", "ppo/TrainerConfig.stop_window = 1",
]


def _main(tmp_path, extra=()):
  args = [f"--gin_file={LR_GIN}", f"--gin.MODEL_DIR='{tmp_path}'"]
  args += [f"--gin.{b}" for b in list(SMOKE) + list(extra)]
  return lr_main(args)


def test_length_reward_end_to_end_then_resumes(tmp_path, clean_gin, capsys):
  assert _main(tmp_path) == 0
  out = capsys.readouterr().out
  assert f"report: {tmp_path / 'report.md'}" in out and "fig2a_reward_vs_lambda.png" in out
  res = json.loads((tmp_path / "results.json").read_text())
  for key in ("lambdas", "dera_reward", "retrained_reward", "dera_kl", "pearson"):
    assert key in res
  # NOTE: lambda = 1 only (the base run reused), to keep to one PPO compile; the
  # beta / lambda retraining path is the same train stage (see the fake-output tests).
  assert res["lambdas"] == [0.0, 1.0]
  assert res["num_rows_per_lambda"] == 12
  assert res["dera_kl"][0] == pytest.approx(0.0, abs=1e-5)  # lambda 0 is the reference
  assert res["identical_samples_fraction"] == {"0": 1.0, "1": 1.0}
  assert res["dera_reward"][1] == res["retrained_reward"][1]
  assert res["stages_run_now"] == ["sft", "eval_sft", "ppo_beta0.1", "dera_sweep",
                                   "eval_ppo_beta0.1"]
  assert res["retrained_beta"] == [None, 0.1]
  # the PPO run's curve of J on held-out prompts (evals at steps 0 and 1, the cap)
  assert res["retrained_steps"] == [None, 1]
  assert res["retrained_stopped_by_rule"][0] is None
  assert isinstance(res["retrained_stopped_by_rule"][1], bool)
  curve = res["retrained_curves"][1]
  assert curve["step"] == [0, 1] and len(curve["J"]) == len(curve["J_se"]) == 2
  assert res["settings"]["ppo_convergence"]["stop_window"] == 1
  assert "ppo_training_curves.png" in res["figures"].values()
  for name in res["figures"].values():
    assert (tmp_path / name).stat().st_size > 0
  assert "reward_vs_kl.png" in res["figures"].values()
  # The optimum and J, recomputed from the samples files.
  sft = stages_lib.read_jsonl(str(tmp_path / "eval_sft" / "samples.jsonl"))
  ppo = stages_lib.read_jsonl(str(tmp_path / "eval_ppo_beta0.1" / "samples.jsonl"))
  p0 = float(np.mean([r["reward"] == 0.0 for r in sft]))
  assert res["p0"] == pytest.approx(p0) and res["base_beta"] == 0.1
  star = opt.binary_optimum(p0, 0.1)
  assert res["optimum_J"] == pytest.approx([p0 - 1.0, star["J"]])
  assert res["optimum_kl"] == pytest.approx([0.0, star["kl"]])
  j1 = float(np.mean([r["reward"] for r in ppo]) - 0.1 * np.mean([r["kl"] for r in ppo]))
  assert res["retrained_J"] == pytest.approx([p0 - 1.0, j1], abs=1e-9)
  assert res["dera_J"][1] == pytest.approx(j1, abs=1e-5)  # same tokens; KL to float32
  assert res["retrained_converged"][0] is True and isinstance(res["retrained_converged"][1], bool)
  assert "Pearson correlation" in (tmp_path / "report.md").read_text()
  rows = stages_lib.read_jsonl(str(tmp_path / "dera_sweep" / "samples.jsonl"))
  assert len(rows) == 6 * 2 * 2
  for r in rows:  # the reward is eq. 10 on the token count
    assert r["reward"] == (0.0 if 2 <= r["length"] <= 5 else -1.0)
  # Rerun: everything cached; a damaged eval stage is redone, training is not.
  (tmp_path / "eval_ppo_beta0.1" / "samples.jsonl").unlink()
  assert _main(tmp_path) == 0
  res2 = json.loads((tmp_path / "results.json").read_text())
  assert res2["stages_run_now"] == ["eval_ppo_beta0.1"]
  assert res2["retrained_reward"] == res["retrained_reward"]
  # A changed training setting is refused rather than mixed into the cached study.
  with pytest.raises(UserError, match="ppo_beta0.1 .* other settings"):
    _main(tmp_path, ["PPO_STEPS = 2"])
  # A bad lambda grid is refused before any compute.
  with pytest.raises(UserError, match="duplicates"):
    _main(tmp_path, ["LAMBDAS = [0.0, 1.0, 1.0]"])
  with pytest.raises(UserError, match="non-finite"):
    _main(tmp_path, ["LAMBDAS = [0.0, 1e400]"])
