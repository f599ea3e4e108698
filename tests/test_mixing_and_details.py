"""Multi-model DeRa in the decode binary (Appendix B of the DeRa paper), and smaller fixes.

Multi-model mixing samples softmax(sum_i lam_i h_i + (1 - sum_i lam_i) h_ref):
a MIXTURE OF LOGITS, then softmax. The rows are checked against that formula
computed here by teacher forcing each model on the sampled tokens, against a
single-model DeRa run when one weight is 0 (same row seeds: same tokens), and
against the reference alone when the weights sum to 0.

Also: greedy DeRa rows (a point mass, like every other method's greedy rows),
blockwise CD's log-probs under p and under the (tempered, truncated) proposal,
the length reward counting sampled ids, NaN standard errors, the RL eval's
regularised objective at the current beta, and one definition of length.
"""

import json
import math
import os
import subprocess
import sys

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from realign_jax import decode as decode_bin
from realign_jax import evaluate as evaluate_bin
from realign_jax.checkpoints import run_dir
from realign_jax.data import vocab as vocab_lib
from realign_jax.decoding import sampler
from realign_jax.plumbing.errors import UserError
from realign_jax.evaluation import best_of_n_theory, stats
from realign_jax.experiments.frontier import results as fr
from realign_jax.experiments import report as rep
from realign_jax.inference.methods_cd import BlockwiseCD
from realign_jax.inference.methods_dera import DeRa
from realign_jax.inference.prompts import encode_prompts
from realign_jax.models.api import LanguageModel
from realign_jax.models.config import replace
from realign_jax.rewards import base as rewards_base
from realign_jax.rewards.length import LengthReward
from tests.helpers import subprocess_xla_flags
from tests.test_decode_methods import CFG, PROMPTS, _init_fn, _random_head, _run_dir

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T = 6
LI = 32
SAMPLING = sampler.SamplingConfig(max_new_tokens=T)
SEEDS = {"ref": 0, "a": 1, "b": 2}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("mixing")
  prompts = root / "prompts.jsonl"
  prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS) + "\n")
  other = root / "other"
  run_dir.write_model_json(str(other), replace(CFG, vocab_size=4096))  # model.json only
  out = {k: _run_dir(root / k, CFG, s) for k, s in SEEDS.items()}
  out.update(other=str(other), prompts=str(prompts))
  return out


DERA_FIELDS = ("lambdas", "aligned_checkpoint", "mixing", "aligned_checkpoints", "lambda_vectors")


def _decode(dirs, out, **kw):
  """The decode binary's function; without `method`, DeRa with the DeRa settings in `kw`."""
  args = dict(ref_checkpoint=dirs["ref"], output_file=str(out), prompt_file=dirs["prompts"],
              input_length=LI, batch_size=2, sampling=SAMPLING, progress=False)
  args.update(kw)
  if "method" not in args:
    args["method"] = DeRa(**{k: args.pop(k) for k in DERA_FIELDS if k in args})
  decode_bin.decode(**args)
  return [json.loads(x) for x in open(out).read().splitlines()]


def _logits_tf(name, inputs, tokens):
  """Teacher-forced logits [B, T, V] of model `name` (params re-made from its seed), float64."""
  lm = LanguageModel(CFG)
  params = _init_fn(CFG, "lm")(jax.random.PRNGKey(SEEDS[name]))
  return np.asarray(lm.forward(params, jnp.asarray(inputs), jnp.asarray(tokens))["logits"],
                    np.float64)


def _log_softmax_no_pad(logits):
  logits = np.array(logits, np.float64)
  logits[..., sampler.PAD_ID] = -np.inf
  m = logits.max(-1, keepdims=True)
  return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))


def _inputs_and_targets(rows):
  vocab = vocab_lib.load_vocabulary(None)
  enc = encode_prompts(vocab, PROMPTS, LI)
  inputs = np.stack([enc[r["prompt_index"]] for r in rows])
  targets = np.zeros((len(rows), T), np.int32)
  for i, r in enumerate(rows):
    targets[i, :r["length"]] = r["tokens"]
  return inputs, targets


# ---- A. multi-model mixing ------------------------------------------------------------------
VECTORS = [[0.6, 0.3], [0.7, 0.0], [0.0, 0.0], [-0.5, 1.5]]


def test_multi_model_mixing_is_the_logit_formula(dirs, tmp_path, capsys):
  """configs/decode/dera_multi_builtin_tiny.gin through main, 3 prompts x 2 samples x 4 vectors."""
  out = tmp_path / "multi.jsonl"
  argv = [f"--gin_file={os.path.join(REPO_ROOT, 'configs/decode/dera_multi_builtin_tiny.gin')}",
          f"--gin.REF_CHECKPOINT='{dirs['ref']}'",
          f"--gin.ALIGNED_CHECKPOINTS=['{dirs['a']}', '{dirs['b']}']",
          f"--gin.LAMBDA_VECTORS={VECTORS}", f"--gin.OUTPUT_FILE='{out}'",
          f"--gin.decode.prompt_file='{dirs['prompts']}'", f"--gin.decode.input_length={LI}",
          "--gin.decode.batch_size=2", "--gin.decode.num_samples=2",
          "--gin.decode.progress=False", f"--gin.SamplingConfig.max_new_tokens={T}"]
  try:
    assert decode_bin.main(argv) == 0
  finally:
    gin.clear_config()
  assert "wrote 24 rows" in capsys.readouterr().out
  rows = [json.loads(x) for x in out.read_text().splitlines()]
  assert [(r["prompt_index"], r["sample"], r["lam"]) for r in rows] == [
      (p, j, v) for p in range(3) for j in range(2) for v in VECTORS]
  by = {tuple(v): [r for r in rows if r["lam"] == v] for v in VECTORS}
  for r in rows:
    assert r["mixing"] == "logits" and len(r["aligned_model_logprobs"]) == 2
    assert "aligned_logprobs" not in r
    assert len(r["tokens"]) == len(r["logprobs"]) == len(r["ref_logprobs"]) == r["length"]

  # the logit formula, by teacher forcing each model on the sampled tokens
  for vec in ((0.6, 0.3), (-0.5, 1.5)):
    sel = by[vec]
    inputs, targets = _inputs_and_targets(sel)
    h = {k: _logits_tf(k, inputs, targets) for k in SEEDS}
    mixed = (1.0 - sum(vec)) * h["ref"] + vec[0] * h["a"] + vec[1] * h["b"]
    logq = _log_softmax_no_pad(mixed)
    logp = {k: _log_softmax_no_pad(v) for k, v in h.items()}
    for i, r in enumerate(sel):
      n = r["length"]
      pick = lambda lp: lp[i, np.arange(n), targets[i, :n]]
      np.testing.assert_allclose(r["logprobs"], pick(logq), atol=2e-4)
      np.testing.assert_allclose(r["ref_logprobs"], pick(logp["ref"]), atol=2e-4)
      np.testing.assert_allclose(r["aligned_model_logprobs"][0], pick(logp["a"]), atol=2e-4)
      np.testing.assert_allclose(r["aligned_model_logprobs"][1], pick(logp["b"]), atol=2e-4)
      q = np.exp(logq[i, :n])
      live = q > 0
      kl = np.sum(q * (np.where(live, logq[i, :n], 0.0) - np.where(live, logp["ref"][i, :n], 0.0)))
      np.testing.assert_allclose(r["kl"], kl, atol=5e-4)
      np.testing.assert_allclose(r["log_ratio"], sum(r["logprobs"]) - sum(r["ref_logprobs"]),
                                 atol=1e-4)
  # NOTE: with the reference's weight 1 - sum lam, normalising the geometric mixture
  # prod_i p_i^{w_i} is the same distribution (Proposition 1 / Appendix B); a mixture
  # of PROBABILITIES would not be.
  r = by[(0.6, 0.3)][0]
  assert not np.allclose(r["logprobs"], np.log(0.1 * np.exp(r["ref_logprobs"]) + 0.6 * np.exp(
      r["aligned_model_logprobs"][0]) + 0.3 * np.exp(r["aligned_model_logprobs"][1])), atol=1e-3)

  # one weight 0: single-model DeRa with the same row seeds, token for token
  single = _decode(dirs, tmp_path / "single.jsonl", aligned_checkpoint=dirs["a"], lambdas=[0.7],
                   num_samples=2)
  # NOTE: two programs (three models vs two): float32 rounding may differ in the last
  # place (log-probs near -9 differ by 2e-6 at XLA's optimisation level 0).
  for s, r in zip(single, by[(0.7, 0.0)]):
    assert s["tokens"] == r["tokens"] and s["lam"] == 0.7
    np.testing.assert_allclose(r["logprobs"], s["logprobs"], atol=1e-5)
    np.testing.assert_allclose(r["aligned_model_logprobs"][0], s["aligned_logprobs"], atol=1e-5)
    np.testing.assert_allclose(r["kl"], s["kl"], atol=1e-5)
  # weights summing to 0: exactly the reference
  alone = _decode(dirs, tmp_path / "ref.jsonl", num_samples=2)
  for s, r in zip(alone, by[(0.0, 0.0)]):
    assert s["tokens"] == r["tokens"]
    np.testing.assert_allclose(r["logprobs"], r["ref_logprobs"], atol=1e-6)
    # NOTE: across programs (three models vs one) as above: last-place float32 rounding.
    np.testing.assert_allclose(r["logprobs"], s["logprobs"], atol=1e-5)
    assert abs(r["kl"]) < 1e-5

  # the evaluation binary groups the rows by their weight vector
  summary = evaluate_bin.evaluate(decode_files=[str(out)], output_file=str(tmp_path / "e.json"))
  assert [tuple(g["lam"]) for g in summary["files"][str(out)]] == [tuple(v) for v in VECTORS]


@pytest.mark.parametrize("kw,match", [
    ({"lambda_vectors": [[0.5, 0.5], [0.5]]},
     r"lambda_vectors\[1\] = \[0.5\] has 1 weights but there are 2 aligned models"),
    ({"lambda_vectors": [[0.5, float("nan")]]}, "finite"),
    ({"lambda_vectors": [[0.5, 0.5], [0.5, 0.5]]}, "duplicates"),
    ({"lambda_vectors": []}, "empty"),
    ({"aligned_checkpoints": ["A", "OTHER"]}, r"vocabulary sizes: 2048 .* vs 4096 \(.*other\)"),
    ({"aligned_checkpoint": "A"}, "not both"),
    ({"lambda_vectors": None}, "needs DeRa.lambda_vectors"),
    ({"lambdas": [0.5]}, "not DeRa.lambdas"),
    ({"mixing": "weights"}, "logits only"),
    ({"mixing": "geometric"}, "DeRa.mixing must be one of"),
    ({"aligned_checkpoints": None}, "give them as DeRa.aligned_checkpoints"),
])
def test_bad_multi_model_settings_are_one_line_errors(dirs, tmp_path, kw, match):
  names = {"A": dirs["a"], "B": dirs["b"], "OTHER": dirs["other"]}
  args = {"aligned_checkpoints": ["A", "B"], "lambda_vectors": [[0.5, 0.5]]}
  args.update(kw)
  if args["aligned_checkpoints"] is not None:
    args["aligned_checkpoints"] = [names[x] for x in args["aligned_checkpoints"]]
  if "aligned_checkpoint" in args:
    args["aligned_checkpoint"] = names[args["aligned_checkpoint"]]
  out = tmp_path / "out.jsonl"
  with pytest.raises(UserError, match=match) as e:
    _decode(dirs, out, **args)
  assert "\n" not in str(e.value)
  assert not [f for f in os.listdir(tmp_path) if f.startswith("out.jsonl")]


def test_weight_count_mismatch_through_the_binary_exits_2(dirs, tmp_path):
  out = tmp_path / "out.jsonl"
  cmd = [sys.executable, "-m", "realign_jax.decode",
         "--gin_file=configs/decode/dera_multi_builtin_tiny.gin",
         f"--gin.REF_CHECKPOINT='{dirs['ref']}'",
         f"--gin.ALIGNED_CHECKPOINTS=['{dirs['a']}', '{dirs['b']}']",
         "--gin.LAMBDA_VECTORS=[[1.0, 0.0], [1.0]]", f"--gin.OUTPUT_FILE='{out}'"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=subprocess_xla_flags())
  proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, env=env, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
  assert len(lines) == 1 and "one weight per aligned model" in lines[0], proc.stderr[-2000:]
  assert not out.exists()


# ---- B1. greedy DeRa rows -------------------------------------------------------------------
def test_greedy_dera_rows_record_a_point_mass(dirs, tmp_path):
  greedy = sampler.SamplingConfig(max_new_tokens=T, greedy=True)
  rows = _decode(dirs, tmp_path / "g.jsonl", aligned_checkpoint=dirs["a"], lambdas=[0.0, 0.5],
                 sampling=greedy)
  assert len(rows) == 6
  for r in rows:  # as every other method's greedy rows: log q = 0, KL = -sum log p_ref(y_t)
    assert r["logprobs"] == [0.0] * r["length"]
    np.testing.assert_allclose(r["kl"], -sum(r["ref_logprobs"]), rtol=1e-6)
    np.testing.assert_allclose(r["log_ratio"], r["kl"], rtol=1e-6)
    assert r["kl"] > 0.1  # a point mass is far from p_ref, even at lambda = 0


# ---- B2. blockwise CD: log-probs under p and under the proposal -----------------------------
def test_cd_block_rows_separate_p_from_the_tempered_truncated_proposal(dirs, tmp_path):
  v_dir = _run_dir(tmp_path / "v_rand", CFG, 4, head="scalar", transform=_random_head(4, 3.0))
  temp, top_k, k, m = 0.5, 20, 2, 3
  cfg = sampler.SamplingConfig(max_new_tokens=T, temperature=temp, top_k=top_k)
  rows = _decode(dirs, tmp_path / "b.jsonl", sampling=cfg,
                 method=BlockwiseCD(value_checkpoint=v_dir, num_candidates=k, block_length=m))
  inputs, targets = _inputs_and_targets(rows)
  h = _logits_tf("ref", inputs, targets)
  logp = _log_softmax_no_pad(h)
  proc = h / temp
  proc[..., sampler.PAD_ID] = -np.inf
  kth = np.sort(proc, axis=-1)[..., -top_k][..., None]
  logq = _log_softmax_no_pad(np.where(proc < kth, -np.inf, proc))
  for i, r in enumerate(rows):
    n = r["length"]
    pick = lambda lp: lp[i, np.arange(n), targets[i, :n]]
    np.testing.assert_allclose(r["ref_logprobs"], pick(logp), atol=2e-4)  # under p itself
    np.testing.assert_allclose(r["proposal_logprobs"], pick(logq), atol=2e-4)
    assert r["kl_to"] == "proposal"
    lp = np.asarray(r["proposal_logprobs"])
    want = sum(best_of_n_theory.kl_estimator(math.exp(lp[s:s + m].sum()), k)
               for s in range(0, n, m))
    np.testing.assert_allclose(r["kl_estimate"], want, rtol=1e-9)
  assert any(not np.allclose(r["ref_logprobs"], r["proposal_logprobs"], atol=1e-3) for r in rows)


# ---- B3. the length reward counts the sampled ids -------------------------------------------
def _split_the():
  """Ids sampled as '▁t' 'h' 'e' + EOS: decoded 'the', which re-encodes as ONE piece."""
  vocab = vocab_lib.load_vocabulary(None)
  sp = vocab.tokenizer
  ids = [sp.piece_to_id("▁t"), sp.piece_to_id("h"), sp.piece_to_id("e")]
  text = vocab_lib.decode(vocab, ids)
  assert text == "the" and len(vocab_lib.encode(vocab, text)) == 1
  return ids + [1], text


def test_length_reward_scores_the_sampled_ids_not_a_re_encoding(tmp_path):
  ids, text = _split_the()
  r = LengthReward(min_length=3, max_length=3)
  assert r.score(["p"], [text]).tolist() == [-1.0]  # the re-encoding: 1 token
  assert r.score_ids(["p"], [text], [ids]).tolist() == [0.0]  # the sampled ids: 3 tokens
  toks = jnp.asarray([ids + [0, 0]], jnp.int32)
  train = r.score_tokens(None, jnp.zeros((1, 4), jnp.int32), toks, jnp.asarray([4]))
  assert np.asarray(train).tolist() == [0.0]  # what RL training counts
  assert rewards_base.score_rows(r, ["p"], [text], [ids]).tolist() == [0.0]
  # decode rows carry their ids: evaluation scores those, also in win rates
  one = [{"prompt": "doc", "response": text, "tokens": ids, "kl": 0.0, "log_ratio": 0.0,
          "lam": None, "prompt_index": 0, "sample": 0, "length": 4}]
  merged = [dict(one[0], tokens=[262, 1], length=2)]  # the same text as one piece
  for name, rows in (("split.jsonl", one), ("merged.jsonl", merged)):
    (tmp_path / name).write_text("".join(json.dumps(x) + "\n" for x in rows))
  summary = evaluate_bin.evaluate(decode_files=[str(tmp_path / "split.jsonl")],
                                  compare_file=str(tmp_path / "merged.jsonl"), reward=r,
                                  output_file=str(tmp_path / "e.json"))
  assert summary["files"][str(tmp_path / "split.jsonl")][0]["reward"] == 0.0
  assert summary["win_rates"][0]["win_rate"] == 1.0  # 3 tokens in [3, 3] beat 1 token


# ---- B4. NaN standard errors ----------------------------------------------------------------
def test_undefined_standard_error_stays_nan_and_prints_as_n_a(capsys):
  m, se = rep.mean_se([2.0])
  assert m == 2.0 and math.isnan(se)
  m, se = rep.mean_se([1.0, 3.0, 2.0, 4.0], groups=[0, 0, 0, 0])  # one prompt
  assert m == 2.5 and math.isnan(se)
  assert math.isfinite(rep.mean_se([1.0, 3.0])[1])
  e = fr.entry("dera", "lambda=1", [{"prompt_index": 0, "sample": j, "reward": float(j),
                                     "kl": 0.5, "tokens": [5, 1]} for j in range(2)])
  assert math.isnan(e["reward_se"]) and math.isnan(e["kl_se"])
  assert rep.fmt(e["reward_se"]) == "n/a" and stats.clean_for_json(e)["reward_se"] is None
  assert rep.disagreements([0.0, 1.0], [0.0, 1.0], [math.nan, math.nan], [5.0, 9.0],
                           [0.1, 0.1]) == []
  v = rep.regularisation_verdict([0.0, 1.0, 2.0], [0.0, 1.0, 2.0], [math.nan] * 3, [0, 1, 2])
  assert v["verdict"] == "undetermined" and "undefined" in v["reason"]
  evaluate_bin._print_summary({"files": {"f": [{"lam": None, "num_rows": 1, "kl_exact": 0.25,
                                                "kl_exact_se": math.nan}]},
                               "win_rates": [{"file": "f", "lam": None, "against": "g",
                                              "against_lam": None, "win_rate": 1.0,
                                              "win_rate_se": math.nan, "num_judged": 1,
                                              "num_pairs": 1, "failures": {}}],
                               "output_file": "o"})
  printed = capsys.readouterr().out
  assert "KL=0.2500±n/a" in printed and "1.000±n/a" in printed and "nan" not in printed


# ---- B5. the RL eval's regularised objective uses the current beta --------------------------
def test_rl_eval_regularised_uses_the_adaptive_beta():
  from realign_jax.training.ppo import PPO
  algo = PPO(model=LanguageModel(CFG), reward=LengthReward(min_length=1, max_length=2),
             beta=0.1, kl_target=1.0, max_eval_examples=2, num_eval_samples=0)
  algo.eval_inputs = lambda: np.zeros((2, 4), np.int32)
  algo.frozen = lambda: None
  algo.__dict__["_eval_fn"] = lambda params, frozen, x, rng: {
      "reward": np.array([0.0, -1.0]), "kl": np.array([2.0, 4.0]), "length": np.array([3, 4]),
      "tokens": np.zeros((2, 4), np.int32)}
  metrics, _ = algo.evaluate(None, 7, aux={"beta": jnp.asarray(0.25, jnp.float32)})
  assert metrics["beta"] == 0.25
  assert metrics["regularised"] == pytest.approx(-0.5 - 0.25 * 3.0)
  metrics, _ = algo.evaluate(None, 0)  # no aux: the configured beta
  assert metrics["regularised"] == pytest.approx(-0.5 - 0.1 * 3.0)


# ---- B6. length: response tokens without EOS, in the frontier and the length study ----------
def test_frontier_and_length_study_share_one_length_definition():
  tokens = np.array([[5, 6, 1, 0], [5, 6, 7, 8]], np.int32)  # EOS after 2 tokens; cut at 4
  lengths = np.array([3, 4], np.int32)  # generated tokens, EOS included (decode rows' length)
  study = np.asarray(rewards_base.response_token_count(jnp.asarray(tokens), jnp.asarray(lengths)))
  assert study.tolist() == [2, 4]  # what the studies' rows record (`PolicySampling`)
  rows = [{"prompt_index": 0, "sample": j, "reward": 0.0, "kl": 0.0,
           "tokens": tokens[j, :lengths[j]].tolist(), "length": int(lengths[j]),
           "ref_logprobs": [-1.0] * int(lengths[j])} for j in range(2)]
  assert fr.entry("dera", "lambda=1", rows)["length"] == 3.0  # (2 + 4) / 2, not (3 + 4) / 2
  assert [fr.response_length(r) for r in rows] == study.tolist()
  assert fr.best_of_n_entries(rows, [2])[0]["length"] == 2.0  # ties: sample 0, 2 tokens
