"""The TL;DR-style study: gold reward, win rates and report from fake rows, bad input, a smoke run."""

import json
import os

import gin
import numpy as np
import pytest

from realign_jax.plumbing.errors import UserError
from realign_jax.experiments import stages as stages_lib
from realign_jax.experiments.tldr_style import config as ts_config
from realign_jax.experiments.tldr_style import gold, pairs
from realign_jax.experiments.tldr_style import report as ts_report
from realign_jax.experiments.tldr_style import results as ts_results
from realign_jax.experiments.tldr_style.__main__ import main as ts_main

TS_GIN = "configs/experiments/tldr_style_tiny.gin"


@pytest.fixture
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


# ---- the gold reward --------------------------------------------------------------------
def test_gold_reward_is_rouge_l_f_by_hand():
  refs = ["the cat sat on the mat", "Return the value.", "a b"]
  # LCS("the cat sat", ref) = 3: P = 3/3, R = 3/6, F = 2 * 1 * 0.5 / 1.5 = 2/3.
  # "return value" vs "return the value": LCS 2, P = 1, R = 2/3, F = 0.8.
  # no common word: 0.
  got = gold.gold_scores(refs, ["The cat sat", "return value", "c d"])
  np.testing.assert_allclose(got, [2 / 3, 0.8, 0.0], atol=1e-12)
  fn = gold.prompt_gold_fn([{"inputs": "p1", "targets": "a b c"}])
  np.testing.assert_allclose(fn(["p1", "p1"], ["a b c", "a"]), [1.0, 0.5], atol=1e-12)
  with pytest.raises(UserError, match="no reference summary for prompt 'p2'"):
    fn(["p2"], ["x"])
  with pytest.raises(UserError, match="2 references for 1 responses"):
    gold.gold_scores(["a", "b"], ["a"])


def test_layout_free_settings(tmp_path):
  root = str(tmp_path / "study")
  s = stages_lib.layout_free(
      {"a": os.path.join(root, "sft"), "b": ["/elsewhere/x", "adamw"], "c": 1.5}, root)
  assert s == {"a": "<MODEL_DIR>/sft", "b": ["/elsewhere/x", "adamw"], "c": 1.5}


# ---- numbers and report from fake decode rows ------------------------------------------------
REFS = ["a b c d", "e f g h"]
GOOD, MID, BAD = "a b c d", "a b", "x"  # gold 1, 2/3, 0 against REFS[0]


def _rows(responses_by_prompt, lam=None, kl=0.0):
  rows = []
  for p, responses in enumerate(responses_by_prompt):
    for j, resp in enumerate(responses):
      ref_words = REFS[p].split()
      # NOTE: the same response shape against each prompt's own reference.
      text = " ".join(ref_words[:len(resp.split())]) if resp != BAD else "x"
      rows.append({"prompt_index": p, "sample": j, "lam": lam, "tokens": [len(text), 1],
                   "length": len(text.split()), "reward": float(len(text.split())),
                   "gold": float(gold.gold_scores([REFS[p]], [text])[0]), "kl": kl,
                   "log_ratio": kl, "response": text})
  return rows


def _fam(dera_by_lam, retrained_by_lam, base):
  dera = [r for lam, resp in dera_by_lam.items() for r in _rows(resp, lam, kl=lam)]
  return {"dera": dera, "base": _rows(base, kl=1.0),
          "retrained": {lam: _rows(resp, kl=lam) for lam, resp in retrained_by_lam.items()},
          "names": {lam: ts_config.run_name("pg", 0.1 / lam) for lam in dera_by_lam}}


def _pw(values):
  return [{"pairwise_accuracy": v, "pairwise_accuracy_se": 0.1, "num_pairs": 10}
          for v in values]


def test_win_rates_and_report_by_hand(tmp_path):
  lambdas = [1.0, 2.0, 5.0]
  sft = [[BAD, BAD], [BAD, MID]]
  # DeRa: lambda 1 is the base model; larger lambdas better.
  dera = {1.0: [[MID, BAD], [BAD, MID]], 2.0: [[MID, MID], [MID, MID]],
          5.0: [[GOOD, GOOD], [GOOD, GOOD]]}
  retr = {1.0: dera[1.0], 2.0: [[MID, BAD], [MID, MID]], 5.0: [[GOOD, MID], [GOOD, GOOD]]}
  fams = {"pg": _fam(dera, retr, dera[1.0])}
  res = ts_results.build_results(
      lambdas=lambdas, beta=0.1, sft_rows=_rows(sft), families=fams,
      pairwise_result={"sft": _pw([0.5])[0], "pg": {"dera": _pw([0.6, 0.7, 0.8]),
                                                     "retrained": _pw([0.6, 0.65, 0.9])}},
      refs=REFS, judge_seed=0, pair_stats={"train": {"pairs": 3}},
      reward_model={"heldout_accuracy": 0.75, "heldout_accuracy_se": 0.1, "heldout_pairs": 4},
      stage_seconds={"sft": 1.0}, invocation_seconds=2.0, ran=["sft"],
      settings={"sft_steps": 1, "reward_model_steps": 1, "pg_steps": 1, "dpo_steps": None,
                "num_eval_prompts": 2, "num_samples": 2, "eval_split": "test", "task": "t",
                "model": "m", "max_new_tokens": 8, "heldout_split": "validation",
                "num_train_pair_prompts": 4, "num_heldout_pair_prompts": 4})
  # Against SFT, pair by pair (win 1, tie 1/2, loss 0), whatever the shown order:
  # lambda 1: (MID>BAD, BAD=BAD, BAD=BAD, MID=MID) -> (1 + .5 + .5 + .5) / 4.
  # lambda 2: (MID>BAD, MID>BAD, MID>BAD, MID=MID) -> 3.5 / 4.
  # lambda 5: all four win -> 1.
  assert res["dera_winrate_vs_sft"] == pytest.approx([0.625, 0.875, 1.0])
  # retrained 2: (MID>BAD, BAD=BAD, MID>BAD, MID=MID) -> 3 / 4; 5: (1, 1, 1, GOOD>MID) -> 1.
  assert res["retrained_winrate_vs_sft"] == pytest.approx([0.625, 0.75, 1.0])
  # DeRa against retrained: lambda 1 identical (1/2); lambda 2: (=, MID>BAD, =, =) -> 2.5 / 4;
  # lambda 5: (=, GOOD>MID, =, =) -> 2.5 / 4.
  assert res["dera_winrate_vs_retrained"] == pytest.approx([0.5, 0.625, 0.625])
  assert res["retrained_winrate_vs_base"][0] == 0.5 and res["dera_winrate_vs_base"][0] == 0.5
  assert res["pearson"] == pytest.approx(np.corrcoef([0.625, 0.875, 1.0],
                                                     [0.625, 0.75, 1.0])[0, 1])
  pg = res["pg"]
  assert pg["pearson"]["pairwise_accuracy"] == pytest.approx(
      np.corrcoef([0.6, 0.7, 0.8], [0.6, 0.65, 0.9])[0, 1])
  assert res["pairwise_accuracy"]["dera"] == [0.6, 0.7, 0.8]
  assert pg["identical_samples_fraction_lambda1"] == 1.0
  assert pg["dera_gold"][0] == pytest.approx((2 / 3 * 2) / 4)
  assert pg["dera_kl"] == pytest.approx(lambdas)
  # The verdict: lambda 1's win rate against SFT (pairs 1, 1/2, 1/2, 1/2: 5/8, standard error
  # 1/8) is not 2 standard errors (2/8) above SFT's own 1/2: no significant alignment gain,
  # so the curve cannot tell whether beta is too strong or too weak; and the report says so.
  assert pg["dera_verdict"]["verdict"] == "no alignment gain"
  assert pg["dera_winrate_vs_sft_se"][0] == pytest.approx(0.125)
  figs = ts_report.write_figures(str(tmp_path), res)
  for path in figs.values():
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  res["figures"] = {k: os.path.basename(v) for k, v in figs.items()}
  text = ts_report.render_report(res)
  assert f"**{res['pearson']:.3f}**" in text and "ROUGE-L F" in text
  assert "fig3a_pg_winrate_vs_sft.png" in text and "no alignment gain" in text
  assert "0.625 ± " in text


def test_no_alignment_gain_is_said():
  lambdas = [1.0, 2.0]
  same = {1.0: [[BAD, BAD], [BAD, BAD]], 2.0: [[BAD, BAD], [BAD, BAD]]}
  out = ts_results.family_results(lambdas, 0.1, _rows(same[1.0]), _fam(same, same, same[1.0]),
                          {"dera": _pw([0.5, 0.5]), "retrained": _pw([0.5, 0.5])}, REFS, 0)
  assert out["dera_winrate_vs_sft"] == [0.5, 0.5]
  assert out["dera_verdict"]["verdict"] == "no alignment gain"
  assert out["pearson"]["winrate_vs_sft"] is None  # constant curves


# ---- human preference pairs (the T5-large config's reward-model data) ---------------------
def test_human_pairs_from_the_comparisons_release(tmp_path):
  # Upstream format: JSON-lines batch*.json rows with info/summaries/choice/split; a CNN/DM
  # row (no post) and a pair of identical summaries are not usable pairs.
  def row(i, split, choice):
    return {"info": {"id": f"t3_{i}", "post": f"Post {i}.", "title": f"Title {i}",
                     "subreddit": "tifu"},
            "summaries": [{"text": f" first {i}", "policy": "sup2", "note": None},
                          {"text": f" second {i}", "policy": "ref", "note": None}],
            "choice": choice, "worker": "w", "batch": "batch1", "split": split}
  same = dict(row(9, "valid1", 0), summaries=[{"text": " x"}, {"text": " x"}])
  cnndm = {"info": {"id": "c", "article": "A.", "site": "cnn"},
           "summaries": [{"text": "a"}, {"text": "b"}], "choice": 0, "split": "valid1"}
  rows = [row(0, "train", 1), row(1, "valid1", 0), same, cnndm, row(2, "train", 0),
          row(3, "train", 1), row(4, "valid1", 1), row(5, "valid2", 0)]
  data = tmp_path / "comparisons"
  data.mkdir()
  (data / "batch1.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
  out = pairs.write_human_pairs(str(tmp_path / "stage"), str(data), "validation", 2, 2)
  assert out["train"] == {"pairs": 2, "skipped_invalid": 0, "source": "tldr_comparisons"}
  assert out["validation"] == {"pairs": 2, "skipped_invalid": 1, "source": "tldr_comparisons"}
  train = stages_lib.read_jsonl(str(tmp_path / "stage" / pairs.TRAIN_PAIRS))
  held = stages_lib.read_jsonl(str(tmp_path / "stage" / pairs.HELDOUT_PAIRS))
  prompt = lambda i: f"SUBREDDIT: r/tifu\nTITLE: Title {i}\nPOST: Post {i}.\nTL;DR:"
  # `choice` names the chosen summary; the leading space after "TL;DR:" is stripped.
  assert train == [{"prompt": prompt(0), "chosen": "second 0", "rejected": "first 0"},
                   {"prompt": prompt(2), "chosen": "first 2", "rejected": "second 2"}]
  assert held == [{"prompt": prompt(1), "chosen": "first 1", "rejected": "second 1"},
                  {"prompt": prompt(4), "chosen": "second 4", "rejected": "first 4"}]
  with pytest.raises(UserError, match="3 preference pairs asked from split validation .* only 2"):
    pairs.write_human_pairs(str(tmp_path / "stage2"), str(data), "validation", 2, 3)
  assert not (tmp_path / "stage2").exists()


def test_t5_large_config_trains_its_reward_model_on_human_comparisons(clean_gin):
  from realign_jax.plumbing import gin_utils
  gin_utils.parse(["configs/experiments/tldr_style_t5_large.gin"],
                  ["MODEL_DIR = 'm'", "INIT_CHECKPOINT = 'i'", "VOCAB_PATH = 'v'",
                   "DATA_DIR = 'd'", "COMPARISONS_DIR = 'human'"])
  assert gin.get_bindings("TldrPairs")["comparisons_dir"] == "human"
  gin.clear_config()
  gin_utils.parse([TS_GIN], ["MODEL_DIR = 'm'"])  # the toy study: synthetic pairs
  assert "comparisons_dir" not in gin.get_bindings("TldrPairs")


# ---- bad input, before any compute --------------------------------------------------------
def _main(tmp_path, extra=()):
  args = [f"--gin_file={TS_GIN}", f"--gin.MODEL_DIR='{tmp_path}'"]
  args += [f"--gin.{b}" for b in list(SMOKE) + list(extra)]
  return ts_main(args)


@pytest.mark.parametrize("extra,match", [
    (["LAMBDAS = [0.5, 1.0, 1.0]"], "duplicates"),
    (["LAMBDAS = [0.0, 1.0]"], "must all be > 0"),
    (["LAMBDAS = [1.0, 1e400]"], "non-finite"),
    (["TldrModels.pg = @PG()"], "PG|reward"),
    (["rm/LanguageModel.output_head = 'lm'"], "output_head 'scalar'"),
    (["DPO.target_length = 4"], "DPO.target_length is 4"),
    (["BETA = 0.0"], "beta must be a finite number > 0"),
])
def test_bad_input_is_refused_before_compute(tmp_path, clean_gin, extra, match):
  with pytest.raises(UserError, match=match):
    _main(tmp_path, extra)
  assert not os.path.exists(tmp_path / "sft")


# ---- end to end ----------------------------------------------------------------------------
SMOKE = [
    "T5Config.d_model = 32", "T5Config.num_heads = 2", "T5Config.head_dim = 16",
    "T5Config.d_ff = 64", "T5Config.num_encoder_layers = 1", "T5Config.num_decoder_layers = 1",
    # NOTE: enough SFT that some sampled pairs get different gold scores (an untrained
    # model's samples share no word with the references: every pair a tie, skipped).
    "SFT_STEPS = 80", "sft/OptimizerSpec.learning_rate = 1e-2", "sft/OptimizerSpec.warmup_steps = 5",
    "RM_STEPS = 2", "PG_STEPS = 1", "DPO_STEPS = 1", "LAMBDAS = [1.0, 2.0]",
    "INPUT_LENGTH = 32", "MAX_NEW_TOKENS = 10",
    "SFT.batch_size = 8", "SFT.target_length = 12",
    "RewardModel.batch_size = 8", "RewardModel.target_length = 16",
    "DPO.batch_size = 8", "DPO.target_length = 16", "PG.batch_size = 8",
    "TldrPairs.num_train_prompts = 32", "TldrPairs.num_heldout_prompts = 16",
    "StudyEvaluation.num_prompts = 6", "StudyEvaluation.num_samples = 2",
    "StudyEvaluation.batch_size = 8",
    # NOTE: the DPO half of the study is the same stage code with another trainer (it ran
    # end to end by hand); the test budget keeps it off here.
    "TldrModels.with_dpo = False",
    "StudyOptions.progress = False", "TrainerConfig.progress = False",
]


def test_tldr_style_end_to_end_then_resumes(tmp_path, clean_gin, capsys):
  assert _main(tmp_path) == 0
  out = capsys.readouterr().out
  assert f"report: {tmp_path / 'report.md'}" in out and "fig3a_pg_winrate_vs_sft.png" in out
  res = json.loads((tmp_path / "results.json").read_text())
  for key in ("lambdas", "dera_winrate_vs_sft", "retrained_winrate_vs_sft", "pairwise_accuracy"):
    assert key in res
  assert res["lambdas"] == [1.0, 2.0]
  assert res["stages_run_now"] == [
      "sft", "preferences", "reward_model", "eval_sft", "pg_beta0.1", "eval_pg_beta0.1",
      "dera_pg", "pg_beta0.05", "eval_pg_beta0.05", "pairwise"]
  assert "dpo" not in res
  for family in ("pg",):
    f = res[family]
    # lambda = 1: DeRa is the base model, token for token, and so is "retrained at beta".
    assert f["identical_samples_fraction_lambda1"] == 1.0
    assert f["dera_winrate_vs_base"][0] == 0.5 and f["retrained_winrate_vs_base"][0] == 0.5
    assert f["dera_winrate_vs_sft"][0] == f["retrained_winrate_vs_sft"][0]
    assert f["dera_pairwise_accuracy"][0] == pytest.approx(f["retrained_pairwise_accuracy"][0])
    assert f["retrained_beta"] == [0.1, 0.05]
    for w in f["dera_winrate_vs_sft"] + f["retrained_winrate_vs_sft"]:
      assert 0.0 <= w <= 1.0
  pairs = res["preference_pairs"]
  assert pairs["train"]["pairs"] >= 1 and pairs["validation"]["pairs"] >= 1
  held = stages_lib.read_jsonl(str(tmp_path / "preferences" / "heldout.jsonl"))
  assert res["num_heldout_pairs"] == len(held) == pairs["validation"]["pairs"]
  # Every held-out pair is labelled by the gold reward: chosen scores strictly higher.
  from realign_jax.data import pipeline
  refs = {e["inputs"]: e["targets"] for e in pipeline.text_examples(
      "builtin_summarize", "validation", limit=16)}
  for r in held:
    c, rj = gold.gold_scores([refs[r["prompt"]]] * 2, [r["chosen"], r["rejected"]])
    assert c > rj
  rows = stages_lib.read_jsonl(str(tmp_path / "dera_pg" / "samples.jsonl"))
  assert len(rows) == 6 * 2 * 2
  for name in res["figures"].values():
    assert (tmp_path / name).stat().st_size > 0
  assert "Pearson correlation" in (tmp_path / "report.md").read_text()
  # Rerun: everything cached; a damaged eval stage is redone, training is not.
  (tmp_path / "eval_pg_beta0.05" / "samples.jsonl").unlink()
  assert _main(tmp_path) == 0
  res2 = json.loads((tmp_path / "results.json").read_text())
  assert res2["stages_run_now"] == ["eval_pg_beta0.05"]
  assert res2["pg"]["retrained_winrate_vs_sft"] == res["pg"]["retrained_winrate_vs_sft"]
  # A changed setting is refused rather than mixed into the cached study.
  with pytest.raises(UserError, match="reward_model .* other settings"):
    _main(tmp_path, ["RM_STEPS = 3"])
