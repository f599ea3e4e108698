"""The reward-vs-KL frontier study: its numbers by hand, then a smoke run of every method."""

import json
import math

import gin
import numpy as np
import pytest

from realign_jax.plumbing.errors import UserError
from realign_jax.evaluation import best_of_n_theory as bon
from realign_jax.evaluation import optimum as opt
from realign_jax.experiments import stages as stages_lib
from realign_jax.experiments.frontier import report as fr_report
from realign_jax.experiments.frontier import results as fr
from realign_jax.experiments.frontier.__main__ import main as fr_main

GIN = "configs/experiments/frontier_tiny.gin"


@pytest.fixture
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


# ---- numbers by hand ---------------------------------------------------------------------
def _rows(rewards_by_prompt, logp=-2.0):
  rows = []
  for p, rs in enumerate(rewards_by_prompt):
    for j, r in enumerate(rs):
      rows.append({"prompt_index": p, "sample": j, "reward": float(r), "length": j + 1,
                   "ref_logprobs": [logp / 2, logp / 2 + 0.01 * j]})
  return rows


def test_best_of_n_entries_by_hand():
  # prompt 0: rewards -1, 0, -1, 0; prompt 1: all -1 (ties everywhere)
  rows = _rows([[-1, 0, -1, 0], [-1, -1, -1, -1]])
  rows.reverse()  # order of rows must not matter
  e1, e2, e4 = fr.best_of_n_entries(rows, [1, 2, 4])
  assert [e["setting"] for e in (e1, e2, e4)] == ["n=1", "n=2", "n=4"]
  assert e1["reward"] == -1.0 and e2["reward"] == -0.5 and e4["reward"] == -0.5
  # kept: n=1 sample 0 of both prompts; n=2 sample 1 of prompt 0, sample 0 of prompt 1
  eps = lambda j: math.exp(-2.0 + 0.01 * j)
  assert e2["kl"] == pytest.approx((bon.kl_estimator(eps(1), 2) + bon.kl_estimator(eps(0), 2)) / 2)
  assert e1["kl"] == pytest.approx(0.0, abs=1e-12)
  assert e4["kl_bound"] == pytest.approx(math.log(4) - 3 / 4)
  # levels: prompt 0 has P(0) = 1/2: best-of-n puts 1 - 2^-n on it; prompt 1 one level, KL 0
  for e, n in ((e2, 2), (e4, 4)):
    q = 1 - 0.5 ** n
    want = q * math.log(q / 0.5) + (1 - q) * math.log((1 - q) / 0.5)
    assert e["kl_levels"] == pytest.approx(want / 2, rel=1e-12)
    assert e["kl_levels"] < e["kl_bound"] and e["kl_kind"] == "bon_estimator"
  with pytest.raises(UserError, match="prompt 1 has 3 samples, not 4"):
    fr.best_of_n_entries([r for r in rows if not (r["prompt_index"] == 1 and r["sample"] == 3)],
                         [1, 4])


def test_pareto_and_budgets_by_hand():
  es = [{"method": "a", "setting": "1", "reward": -1.0, "kl": 0.0, "kl_kind": "exact"},
        {"method": "a", "setting": "2", "reward": -0.5, "kl": 1.0, "kl_kind": "exact"},
        {"method": "b", "setting": "1", "reward": -0.6, "kl": 1.5, "kl_kind": "exact"},  # dominated
        {"method": "b", "setting": "2", "reward": -0.1, "kl": 3.0, "kl_kind": "bon_estimator"},
        {"method": "c", "setting": "1", "reward": -1.0, "kl": 0.0, "kl_kind": "exact"}]  # tie
  assert fr.pareto(es) in ([0, 4, 1, 3], [4, 0, 1, 3])
  b = {x["budget"]: x for x in fr.budget_table(es, budgets=(0.5, 1.0, 2.0, 4.0))}
  assert (b[0.5]["method"], b[1.0]["setting"], b[2.0]["reward"]) == ("a", "2", -0.5)
  assert (b[4.0]["method"], b[4.0]["kl_kind"]) == ("b", "bon_estimator")
  assert fr.budget_table(es, budgets=(-1.0,))[0]["method"] is None


def _fake_entries():
  return [{"method": "ppo", "setting": "beta=0.1", "reward": 0.2, "reward_se": 0.05,
           "kl": 0.0, "kl_se": 0.0, "kl_kind": "exact", "kl_bound": None, "length": 3.0,
           "stage": "ppo_beta0.1"},
          {"method": "best_of_n", "setting": "n=4", "reward": 0.5, "reward_se": 0.1,
           "kl": 50.0, "kl_se": 0.1, "kl_kind": "bon_estimator", "kl_bound": 0.64,
           "kl_levels": 0.5, "length": 3.0, "stage": "best_of_n"}]


def test_optimum_block_and_gaps_by_hand(tmp_path):
  # Three reward levels in the SFT samples: the self-normalised estimate.
  ref = [{"prompt_index": p, "sample": j, "reward": r}
         for p, rs in enumerate([[1.0, -0.5], [0.3, 0.3]]) for j, r in enumerate(rs)]
  res = fr.build_results(_fake_entries(), settings={}, reference_rows=ref)
  best = res["optimum"]
  assert best["kind"] == "estimate" and best["num_samples"] == 4
  assert best["reference_reward"] == pytest.approx(0.275)
  e0, e1 = res["entries"]
  # at KL 0 the optimum is p itself (mean 0.275); at 50 nats, beyond the curve, max r = 1
  assert e0["optimum_reward_at_kl"] == pytest.approx(0.275) and e0["gap_to_optimum"] == \
      pytest.approx(0.075)
  assert e1["optimum_reward_at_kl"] == pytest.approx(1.0, abs=1e-9)
  assert e1["gap_to_optimum"] == pytest.approx(0.5, abs=1e-9)
  text = fr_report.render_report(dict(res, stage_seconds={}, invocation_seconds=1.0,
                               stages_run_now=[], settings=_fake_settings()))
  assert "self-normalised estimate from the 4 samples" in text
  assert "| 0.275 | 0.075 |" in text
  fr_report.plot_frontier(str(tmp_path / "f.png"), res)
  assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
  # Without samples of the SFT model: no optimum, no gaps, said so.
  none = fr.build_results(_fake_entries(), settings={})
  assert none["optimum"]["kind"] is None and none["entries"][0]["gap_to_optimum"] is None
  text = fr_report.render_report(dict(none, stage_seconds={}, invocation_seconds=1.0,
                               stages_run_now=[], settings=_fake_settings()))
  assert "No optimum: no samples of the SFT model" in text


def _fake_settings():
  return {"task": "t", "reward": "r", "model": "m", "sft_steps": 1, "ppo_steps": 1,
          "value_steps": 1, "num_prompts": 2, "split": "validation", "num_samples": 2,
          "max_new_tokens": 6, "aligned_beta": 0.1, "cd_top_k": 4, "cd_q_top_k": [0],
          "block_length": 3, "tq_top_k": 3, "tq_horizon": 3, "tq_alpha_convention": "paper",
          "args_top_k": 4}


# ---- end to end ------------------------------------------------------------------------------
SMOKE = [
    "T5Config.d_model = 32", "T5Config.num_heads = 2", "T5Config.head_dim = 16",
    "T5Config.d_ff = 64", "T5Config.num_encoder_layers = 1", "T5Config.num_decoder_layers = 1",
    # NOTE: enough SFT (cheap steps; the compiles cost the same) that some samples end
    # within the reward's window and others do not: with every reward -1, the reward
    # checks below would hold for any selection of samples.
    "SFT_STEPS = 60", "sft/OptimizerSpec.learning_rate = 1e-2",
    "sft/OptimizerSpec.warmup_steps = 5", "PPO_STEPS = 1", "VALUE_STEPS = 1",
    "SFT.batch_size = 8", "SFT.input_length = 32", "SFT.target_length = 6",
    "PPO.batch_size = 8", "PPO.input_length = 32", "PPO.max_new_tokens = 6",
    "PPO.num_epochs = 1", "PPO.num_minibatches = 1",
    "LengthReward.min_length = 2", "LengthReward.max_length = 4",
    "FrontierMethods.betas = [0.1]", "FrontierMethods.lambdas = [0.0, 1.0]",
    "FrontierMethods.best_of_n = [1, 2, 4]",
    "FrontierMethods.cd_betas = [0.1]", "FrontierMethods.block_candidates = [2]",
    "FrontierMethods.block_length = 3",
    "FrontierMethods.tq_alphas = [1.0]", "FrontierMethods.tq_horizon = 3",
    "FrontierMethods.args_weights = [1.0]",
    "FrontierMethods.cd_top_k = 4", "FrontierMethods.cd_q_top_k = 0", "FrontierMethods.tq_top_k = 3",
    "FrontierMethods.args_top_k = 4",
    "FrontierTraining.value_batch_size = 8", "StudyEvaluation.num_prompts = 3",
    "StudyEvaluation.batch_size = 2",
    "StudyOptions.compilation_cache = False", "StudyOptions.progress = False",
    "TrainerConfig.progress = False",
]


def _main(tmp_path, extra=()):
  args = [f"--gin_file={GIN}", f"--gin.MODEL_DIR='{tmp_path}'"]
  return fr_main(args + [f"--gin.{b}" for b in list(SMOKE) + list(extra)])


def _response_length(tokens) -> int:
  return len(tokens) - (tokens[-1] == 1)  # EOS not counted


def _eq10(tokens) -> float:
  """The smoke run's reward: eq. 10 on the token count, window [2, 4]."""
  return 0.0 if 2 <= _response_length(tokens) <= 4 else -1.0


def _bon_kl_estimate(eps: float, n: int) -> float:
  """KL_hat(eps, n) of Beirami et al. (2024), by its formula."""
  log_a = n * math.log1p(-eps)  # log (1 - eps)^n
  a, b = math.exp(log_a), -math.expm1(log_a)
  return a * (math.log(n) + (n - 1) * math.log1p(-eps) - (n - 1) / n) + b * math.log(b / eps)


def _check_entries_against_samples(model_dir, entries):
  """Each entry of results.json recomputed from its stage's samples.jsonl."""
  rows_of = {x["stage"]: stages_lib.read_jsonl(str(model_dir / x["stage"] / "samples.jsonl"))
             for x in entries}
  for stage, rows in rows_of.items():
    for r in rows:
      assert r["length"] == len(r["tokens"]) and r["reward"] == _eq10(r["tokens"]), (stage, r)
  assert {r["reward"] for rows in rows_of.values() for r in rows} == {-1.0, 0.0}
  for x in entries:
    rows = rows_of[x["stage"]]
    if x["method"] == "best_of_n":
      n = int(x["setting"][len("n="):])
      by_prompt = {}
      for r in rows:
        by_prompt.setdefault(r["prompt_index"], {})[r["sample"]] = r
      assert sorted(by_prompt) == [0, 1, 2] and all(sorted(s) == [0, 1, 2, 3]
                                                    for s in by_prompt.values())
      # the first of the highest reward among the prompt's samples 0..n-1
      kept = [max((s[j] for j in range(n)), key=lambda r: r["reward"])
              for s in by_prompt.values()]
      assert x["num_rows"] == 3
      assert x["kl_bound"] == pytest.approx(math.log(n) - (n - 1) / n, abs=1e-12)
      kls = [_bon_kl_estimate(math.exp(sum(r["ref_logprobs"])), n) for r in kept]
      assert x["kl"] == pytest.approx(np.mean(kls), rel=1e-9, abs=1e-12)
      if n == 1:
        assert x["kl"] == pytest.approx(0.0, abs=1e-12) and x["kl_bound"] == 0.0
    else:
      if x["method"] == "dera":
        rows = [r for r in rows if r["lam"] == float(x["setting"][len("lambda="):])]
      kept = rows
      assert x["num_rows"] == len(rows) == 3 * 2
      if x["kl_kind"] == "exact":
        assert all(r["kl"] >= -1e-6 for r in rows)
        assert x["kl"] == pytest.approx(np.mean([r["kl"] for r in rows]), rel=1e-9, abs=1e-12)
      else:  # blockwise CD: per block, best of K = 2 blocks of M = 3 tokens
        for r in rows:
          assert r["blocks"] == math.ceil(len(r["tokens"]) / 3)
          assert r["kl_bound"] == pytest.approx(r["blocks"] * (math.log(2) - 1 / 2))
          assert r["kl_estimate"] <= r["kl_bound"] + 1e-9
        assert x["kl_bound"] == pytest.approx(np.mean([r["kl_bound"] for r in rows]))
        assert x["kl"] == pytest.approx(np.mean([r["kl_estimate"] for r in rows]), rel=1e-9)
    # (equal numbers of rows per prompt: the mean of the prompts' means is the mean)
    assert x["reward"] == pytest.approx(np.mean([r["reward"] for r in kept]), abs=1e-12)
    # entries' lengths count tokens without EOS (the rows' `length` counts EOS)
    assert x["length"] == pytest.approx(np.mean([_response_length(r["tokens"]) for r in kept]),
                                        abs=1e-12)


def test_frontier_end_to_end_then_resumes(tmp_path, clean_gin, capsys):
  assert _main(tmp_path) == 0
  assert f"report: {tmp_path / 'report.md'}" in capsys.readouterr().out
  assert (tmp_path / "frontier.png").stat().st_size > 0
  res = json.loads((tmp_path / "results.json").read_text())
  got = [(e["method"], e["setting"]) for e in res["entries"]]
  assert got == [("best_of_n", "n=1"), ("best_of_n", "n=2"), ("best_of_n", "n=4"),
                 ("ppo", "beta=0.1"), ("dera", "lambda=0"), ("dera", "lambda=1"),
                 ("cd_token_fudge", "beta=0.1,k=4"), ("cd_token_q", "beta=0.1,k=vocab"),
                 ("cd_block", "K=2,M=3"), ("tq_direct", "alpha=1"), ("args", "w=1")]
  e = {(x["method"], x["setting"]): x for x in res["entries"]}
  for x in res["entries"]:
    for k in ("method", "setting", "reward", "kl", "kl_kind"):
      assert x[k] is not None, (k, x)
    assert -1.0 <= x["reward"] <= 0.0 and x["kl"] >= -1e-6
    want = "bon_estimator" if x["method"] in ("best_of_n", "cd_block") else "exact"
    assert x["kl_kind"] == want
    if want == "bon_estimator":
      assert x["kl"] <= x["kl_bound"] + 1e-9
  # exact identities of the pipeline
  assert e[("dera", "lambda=0")]["kl"] == pytest.approx(0.0, abs=1e-5)  # DeRa at 0 is p
  for k in ("reward", "kl", "length"):  # DeRa at 1 is the PPO model, same row seeds
    assert e[("dera", "lambda=1")][k] == e[("ppo", "beta=0.1")][k]
  assert e[("ppo", "beta=0.1")]["kl"] > 1e-5  # the PPO step moved the policy (0.0014)
  bon_rewards = [e[("best_of_n", f"n={n}")]["reward"] for n in (1, 2, 4)]
  assert bon_rewards == sorted(bon_rewards)  # nested subsets: never worse with n
  _check_entries_against_samples(tmp_path, res["entries"])
  assert any(x["pareto"] for x in res["entries"]) and len(res["budgets"]) == len(fr.BUDGETS)
  report = (tmp_path / "report.md").read_text()
  assert "Transfer Q* direct" in report and "bon_estimator" in report
  # The optimum: closed form from the best_of_n stage's samples of the SFT model (reward
  # in {-1, 0}); each entry's gap against the optimum's reward at its KL, found here by
  # bisection on beta of the closed form.
  ref = stages_lib.read_jsonl(str(tmp_path / "best_of_n" / "samples.jsonl"))
  p0 = float(np.mean([r["reward"] == 0.0 for r in ref]))
  assert 0 < p0 < 1
  best = res["optimum"]
  assert best["kind"] == "exact" and best["p0"] == pytest.approx(p0) and best["levels"] == [-1, 0]
  assert "exact KL-regularised optimum" in report and f"p0 = {100 * p0:.1f}%" in report
  for x in res["entries"]:
    lo, hi = 1e-4, 1e4
    if x["kl"] >= -math.log(p0):
      want = 0.0
    else:
      for _ in range(200):  # KL of the optimum decreases in beta
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if opt.binary_optimum(p0, mid)["kl"] > x["kl"] else (lo, mid)
      want = opt.binary_optimum(p0, lo)["reward"]
    assert x["optimum_reward_at_kl"] == pytest.approx(want, abs=2e-3), x
    assert x["gap_to_optimum"] == pytest.approx(want - x["reward"], abs=2e-3)
  # Rerun: everything cached; a damaged decode stage is redone, nothing else.
  (tmp_path / "args_w1" / "samples.jsonl").unlink()
  assert _main(tmp_path) == 0
  res2 = json.loads((tmp_path / "results.json").read_text())
  assert res2["stages_run_now"] == ["args_w1"]
  assert [x["reward"] for x in res2["entries"]] == [x["reward"] for x in res["entries"]]
  # A changed training setting is refused rather than mixed into the cached study.
  with pytest.raises(UserError, match="value_fudge .* other settings"):
    _main(tmp_path, ["VALUE_STEPS = 2"])


@pytest.mark.parametrize("extra,match", [
    (["FrontierMethods.aligned_beta = 0.5"],
     r"FrontierMethods.aligned_beta = 0.5 .* is not one of FrontierMethods.betas"),
    (["FrontierMethods.methods = ['best_of_n', 'beam']"],
     "FrontierMethods.methods must be distinct names"),
    (["FrontierMethods.best_of_n = [0, 2]"], r"best_of_n must hold integers >= 1, got 0"),
    (["FrontierMethods.cd_betas = [0.0]"], r"FrontierMethods.cd_betas must hold numbers > 0"),
    (["FrontierMethods.cd_top_k = 99999"], r"cd_top_k = 99999 is larger than the vocabulary"),
    (["FrontierMethods.tq_horizon = 0"], r"tq_horizon \(H\) must be an integer >= 1"),
    # the paper's alpha is a KL weight (Q / alpha): 0 is not a setting
    (["FrontierMethods.tq_alphas = [0.0, 1.0]"], r"tq_alphas must hold numbers > 0, got 0.0"),
    (["FrontierMethods.tq_alpha_convention = 'inverse'"], "tq_alpha_convention must be one of"),
    (["FrontierMethods.block_length = 0"], r"block_length \(M\) must be an integer >= 1"),
    (["FrontierMethods.args_weights = [1.0, 1.0]"], "args_weights holds duplicates"),
    (["FrontierMethods.lambdas = [0.0, -1.0]"], r"FrontierMethods.lambdas must all be >= 0"),
    (["FrontierTraining.value_steps = 0"], r"FrontierTraining.value_steps must be an integer"),
    (["StudyEvaluation.num_samples = 0"], r"StudyEvaluation.num_samples must be an integer"),
    (["PPO.kl_target = 1.0"], "sweeps a fixed beta"),
])
def test_bad_settings_are_refused_before_any_compute(tmp_path, clean_gin, extra, match):
  with pytest.raises(UserError, match=match):
    _main(tmp_path / "d", extra)
  assert not (tmp_path / "d").exists()
