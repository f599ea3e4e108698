"""Evaluation metrics against mathematics: best-of-n theory by enumeration, KL
estimators against an enumerated toy sampler, ROUGE and diversity by hand,
win rates, pairwise accuracy (eq. 14) with a tiny model, and the evaluate binary."""

import itertools
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

from realign_jax import evaluate as evaluate_bin
from realign_jax.plumbing import gin_utils
from realign_jax.data import vocab as vocab_lib
from realign_jax.plumbing.errors import UserError
from realign_jax.evaluation import best_of_n_theory as bon
from realign_jax.evaluation import judges, kl, pairwise, stats, text_metrics
from realign_jax.evaluation import win_rate as wr
from realign_jax.models.api import LanguageModel
from tests.helpers import TINY_BUILTIN, assert_one_line_error, run_main

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- best-of-n theory ---------------------------------------------------------
def _h(x):
  return -x * math.log(x) - (1 - x) * math.log(1 - x)


def _brute_force(p, r, n):
  """pi_n, KL(pi_n || p) and win rate by enumerating all n-tuples (uniform tie-breaking)."""
  k = len(p)
  pi = np.zeros(k)
  for t in itertools.product(range(k), repeat=n):
    prob = np.prod([p[i] for i in t])
    best = max(r[i] for i in t)
    tied = [i for i in t if r[i] == best]
    for i in tied:
      pi[i] += prob / len(tied)
  kl_val = sum(pi[i] * math.log(pi[i] / p[i]) for i in range(k) if pi[i] > 0)
  win = sum(pi[y] * p[z] * (1.0 if r[y] > r[z] else 0.5 if r[y] == r[z] else 0.0)
            for y in range(k) for z in range(k))
  return pi, kl_val, win


@pytest.mark.parametrize("n", [1, 2, 3, 5, 10, 40])
def test_example_1_of_the_talk(n):
  # Two equiprobable outcomes, r(0) = 0, r(1) = 1: KL = log 2 - h(2^-n) exactly.
  assert bon.exact_kl([0.5, 0.5], [0.0, 1.0], n) == pytest.approx(
      math.log(2) - _h(2.0 ** -n), abs=1e-13)
  np.testing.assert_allclose(bon.best_of_n_distribution([0.5, 0.5], [0, 1], n),
                             [2.0 ** -n, 1 - 2.0 ** -n], rtol=1e-13)
  # Win rate: ties happen when both land on 1 or both on 0.
  q = 2.0 ** -n
  expected = (1 - q) * 0.5 * 1.0 + (1 - q) * 0.5 * 0.5 + q * 0.5 * 0.5
  assert bon.exact_win_rate([0.5, 0.5], [0, 1], n) == pytest.approx(expected, abs=1e-14)
  if n > 1:  # the "analytical formula" is a strict bound here
    assert bon.exact_kl([0.5, 0.5], [0, 1], n) < bon.kl_bound(n)


def test_exact_kl_and_win_rate_equal_enumeration_with_ties():
  rng = np.random.default_rng(0)
  for trial in range(12):
    k = int(rng.integers(2, 5))
    n = int(rng.integers(1, 5))
    p = rng.dirichlet(np.ones(k))
    if trial % 3 == 0:
      p[0] = 0.0  # a zero-probability outcome
      p /= p.sum()
    r = rng.integers(0, 3, k).astype(float)  # ties in reward are common
    pi, kl_val, win = _brute_force(p, r, n)
    np.testing.assert_allclose(bon.best_of_n_distribution(p, r, n), pi, atol=1e-14)
    assert bon.exact_kl(p, r, n) == pytest.approx(kl_val, abs=1e-13)
    assert bon.exact_win_rate(p, r, n) == pytest.approx(win, abs=1e-13)


def test_exact_kl_never_exceeds_the_bound_and_win_rate_its_bound():
  rng = np.random.default_rng(1)
  for _ in range(300):
    k = int(rng.integers(1, 40))
    n = int(rng.integers(1, 200))
    p = rng.dirichlet(np.full(k, float(rng.choice([0.1, 1.0, 10.0]))))
    r = rng.integers(0, int(rng.integers(1, k + 1)), k).astype(float)
    assert bon.exact_kl(p, r, n) <= bon.kl_bound(n) + 1e-12
    assert bon.exact_win_rate(p, r, n) <= bon.win_rate_bound(n) + 1e-12
  # Many equiprobable distinct outcomes approach both bounds.
  k, n = 100_000, 4
  p, r = np.full(k, 1.0 / k), np.arange(k, dtype=float)
  assert bon.exact_kl(p, r, n) == pytest.approx(bon.kl_bound(n), abs=1e-3)
  assert bon.exact_win_rate(p, r, n) == pytest.approx(bon.win_rate_bound(n), abs=1e-4)


def test_kl_estimator_values():
  n = 2  # eps = 1/2: (1/4)(log 2 + log(1/2) - 1/2) + (3/4) log((3/4) / (1/2))
  assert bon.kl_estimator(0.5, n) == pytest.approx(-0.125 + 0.75 * math.log(1.5), abs=1e-14)
  assert bon.kl_estimator(1e-12, 8) == pytest.approx(bon.kl_bound(8), abs=1e-9)
  assert bon.kl_estimator(1.0, 8) == 0.0
  np.testing.assert_allclose(bon.kl_estimator([0.2, 0.7], 1), [0.0, 0.0], atol=1e-15)
  out = bon.kl_estimate_from_samples([0.5, 0.5, 0.5], 2)
  assert out["kl_hat"] == pytest.approx(-0.125 + 0.75 * math.log(1.5))
  assert out["kl_hat_se"] == pytest.approx(0.0, abs=1e-15) and out["kl_bound"] == bon.kl_bound(2)


@pytest.mark.parametrize("call", [
    lambda: bon.kl_bound(0), lambda: bon.exact_kl([0.5, 0.6], [0, 1], 2),
    lambda: bon.exact_kl([0.5, 0.5], [0, float("nan")], 2),
    lambda: bon.exact_win_rate([1.0], [0.0, 1.0], 2), lambda: bon.kl_estimator(0.0, 2),
    lambda: bon.kl_estimator(1.5, 2), lambda: bon.exact_kl([1.0], [0.0], 2.5)])
def test_best_of_n_bad_input(call):
  with pytest.raises(UserError):
    call()


# ---- KL estimates -------------------------------------------------------------
def test_kl_estimators_agree_with_enumeration_on_a_toy_sampler():
  # Two steps over 3 tokens; step-2 distributions depend on the first token.
  rng = np.random.default_rng(2)
  q1, p1 = rng.dirichlet(np.ones(3)), rng.dirichlet(np.ones(3))
  q2, p2 = rng.dirichlet(np.ones(3), 3), rng.dirichlet(np.ones(3), 3)
  kl_step = lambda a, b: float(np.sum(a * np.log(a / b)))
  true_kl = sum(q1[a] * q2[a, b] * math.log(q1[a] * q2[a, b] / (p1[a] * p2[a, b]))
                for a in range(3) for b in range(3))
  rows = []
  for i in range(4000):
    a = rng.choice(3, p=q1)
    b = rng.choice(3, p=q2[a])
    rows.append({"prompt_index": i, "kl": kl_step(q1, p1) + kl_step(q2[a], p2[a]),
                 "log_ratio": math.log(q1[a] / p1[a]) + math.log(q2[a, b] / p2[a, b])})
  out = kl.kl_from_rows(rows)
  assert out["num_samples"] == 4000
  assert abs(out["kl_exact"] - true_kl) < 4 * out["kl_exact_se"]
  assert abs(out["kl_log_ratio"] - true_kl) < 4 * out["kl_log_ratio_se"]
  assert out["kl_exact_se"] < out["kl_log_ratio_se"]  # the exact sum has lower variance


def test_stderr_by_hand_and_per_prompt():
  mean, se = stats.mean_and_stderr([1.0, 2.0, 3.0, 6.0])
  assert mean == 3.0 and se == pytest.approx(math.sqrt(14 / 3) / 2)
  # Two samples per prompt: the SE is that of the per-prompt means [1.5, 4.5].
  mean, se = stats.mean_and_stderr([1.0, 2.0, 3.0, 6.0], groups=[0, 0, 1, 1])
  assert mean == 3.0 and se == pytest.approx(1.5)
  rows = [{"prompt_index": i // 2, "kl": v, "log_ratio": v} for i, v in enumerate([1, 2, 3, 6])]
  assert kl.kl_from_rows(rows)["kl_exact_se"] == pytest.approx(1.5)
  assert math.isnan(stats.mean_and_stderr([2.0])[1])
  assert stats.clean_for_json({"a": [float("nan"), np.float32(1.5)], "b": np.int64(2)}) == {
      "a": [None, 1.5], "b": 2}


# ---- text metrics -------------------------------------------------------------
def test_rouge_by_hand():
  c, r = "The cat sat on the mat.", "the cat is on the MAT"
  assert text_metrics.tokenize(c) == ["the", "cat", "sat", "on", "the", "mat"]
  assert text_metrics.rouge_n(c, r, 1) == pytest.approx(5 / 6)  # the x2, cat, on, mat
  assert text_metrics.rouge_n(c, r, 2) == pytest.approx(3 / 5)  # the cat, on the, the mat
  assert text_metrics.rouge_l(c, r) == pytest.approx(5 / 6)  # the cat on the mat
  # Precision 1, recall 3/5: F = 2 * 3/5 / (8/5) = 3/4.
  assert text_metrics.rouge_n("a b c", "a b c d e", 1) == pytest.approx(0.75)
  assert text_metrics.rouge_l("a c e", "a b c d e") == pytest.approx(0.75)
  # LCS of "e d c" and "a b c d e" is one word: P = 1/3, R = 1/5.
  assert text_metrics.rouge_l("e d c", "a b c d e") == pytest.approx(
      2 * (1 / 3) * (1 / 5) / (8 / 15))
  # Clipped counts: "the" once in the reference.
  assert text_metrics.rouge_n("the the the", "the cat", 1) == pytest.approx(0.4)
  assert text_metrics.rouge_n("", "the cat", 1) == 0.0
  assert text_metrics.rouge_n("a b", "c d", 2) == 0.0
  out = text_metrics.rouge_scores([c, "a b c"], [r, "a b c d e"])
  assert out["rouge1"] == pytest.approx((5 / 6 + 0.75) / 2)


def test_diversity_by_hand():
  texts = ["a a b", "a b c"]
  assert text_metrics.distinct_n(texts, 1) == pytest.approx(3 / 6)
  assert text_metrics.distinct_n(texts, 2) == pytest.approx(3 / 4)
  assert text_metrics.rep_n(texts, 1) == pytest.approx((1 / 3 + 0) / 2)
  assert text_metrics.rep_n(texts, 2) == 0.0
  assert text_metrics.rep_n(["x y x y x y", "z"], 2) == pytest.approx((1 - 2 / 5) / 2)
  assert math.isnan(text_metrics.distinct_n(["a"], 2))


# ---- win rates ----------------------------------------------------------------
class _FirstWins:
  """A judge with total position bias."""

  def compare(self, prompts, first, second):
    return judges.Judgement(np.ones(len(prompts)), {})


def test_win_rate_swaps_back_and_counts_ties():
  judge = judges.RewardJudge(lambda p, r: [float(len(x)) for x in r], name="len")
  prompts = ["x"] * 4
  one, two = ["aaa", "a", "aa", "bb"], ["a", "aaa", "aa", "b"]  # win, loss, tie, win
  for swap in itertools.product([False, True], repeat=4):
    out = wr.win_rate(judge, prompts, one, two, swap=swap)
    assert out["win_rate"] == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert (out["wins"], out["losses"], out["ties"]) == (2, 1, 1)
  # A judge that always picks the first position: swapping makes its bias cancel.
  out = wr.win_rate(_FirstWins(), prompts, one, two, swap=[True, False, True, False])
  assert out["win_rate"] == 0.5 and out["num_swapped"] == 2
  out = wr.win_rate(_FirstWins(), ["x"] * 2000, ["a"] * 2000, ["b"] * 2000, seed=3)
  assert abs(out["win_rate"] - 0.5) < 4 * out["win_rate_se"]


def test_win_rate_counts_failures():
  judge = judges.RewardJudge(lambda p, r: [float("nan") if x == "?" else 1.0 for x in r])
  out = wr.win_rate(judge, ["x"] * 3, ["a", "?", "b"], ["c", "d", "e"], seed=0)
  assert out["num_pairs"] == 3 and out["num_judged"] == 2 and out["num_failed"] == 1
  assert out["failures"] == {"non_finite_reward": 1} and out["win_rate"] == 0.5
  out = wr.summarize([1.0, np.nan])
  assert out["failures"] == {"unexplained": 1}
  assert wr.summarize([np.nan])["win_rate"] is None


# ---- pairwise accuracy --------------------------------------------------------
def test_pairwise_accuracy_by_hand():
  # Normalised: chosen -1, -2, -1/3 vs rejected -1, -1, -1: a tie is a miss, then miss, hit.
  out = pairwise.pairwise_accuracy([-2, -6, -1], [2, 3, 3], [-3, -2, -4], [3, 2, 4])
  assert out["pairwise_accuracy"] == pytest.approx(1 / 3) and out["num_pairs"] == 3
  # Unnormalised the first pair would be a hit: the normalisation matters.
  lp = np.array([[-1.0, -1.0, 5.0], [-0.5, -0.5, -0.5]])
  mask = np.array([[1, 1, 0], [1, 1, 1]], bool)
  out = pairwise.pairwise_accuracy_from_token_logprobs(lp[:1], mask[:1], lp[1:], mask[1:])
  assert out["pairwise_accuracy"] == 0.0  # -1 vs -0.5; the masked 5.0 is ignored
  with pytest.raises(UserError):
    pairwise.pairwise_accuracy([], [], [], [])


@pytest.fixture(scope="module")
def tiny_pair():
  # NOTE: one model over the built-in vocabulary, one shape [4, 8] x [4, 12]
  # for every call, so the scorer and the reference forward compile once each.
  lm = LanguageModel(TINY_BUILTIN["t5"])
  p1, _ = lm.init(jax.random.PRNGKey(0))
  p2, _ = lm.init(jax.random.PRNGKey(1))
  forward = jax.jit(lambda p, x, t: lm.forward(p, x, t)["logits"])
  return lm, p1, p2, pairwise.make_pair_logprob_fn([lm, lm]), forward


def _manual_logprob(forward, params_list, w, inputs, targets):
  """Sum over real tokens of log softmax(sum_m w_m logits_m) without pad, by hand in numpy."""
  logits = sum(wi * np.asarray(forward(p, inputs, targets), np.float64)
               for wi, p in zip(w, params_list))
  logits[..., 0] = -np.inf  # pad is never sampled, so never scored
  logits = logits - logits.max(-1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  out = []
  for b in range(targets.shape[0]):
    n = int(np.sum(targets[b] != 0))
    out.append(sum(logp[b, t, targets[b, t]] for t in range(n)))
  return np.array(out)


def test_pair_logprob_fn_matches_a_manual_forward_and_mixes_like_dera(tiny_pair):
  from tests.helpers import random_batch
  _, p1, p2, fn, forward = tiny_pair
  rng = np.random.default_rng(0)
  inputs, chosen = random_batch(rng, 4, 8, 12, 2048)
  _, rejected = random_batch(rng, 4, 8, 12, 2048)
  for w in ([1.0, 0.0], [0.5, 0.5], [-1.0, 2.0]):  # lam = 0, 0.5, 2 over (ref, aligned)
    lc, nc, lr, nr = jax.device_get(fn((p1, p2), jnp.array(w), inputs, chosen, rejected))
    np.testing.assert_allclose(lc, _manual_logprob(forward, (p1, p2), w, inputs, chosen),
                               rtol=1e-4)
    np.testing.assert_allclose(lr, _manual_logprob(forward, (p1, p2), w, inputs, rejected),
                               rtol=1e-4)
    np.testing.assert_array_equal(nc, (chosen != 0).sum(1))
    np.testing.assert_array_equal(nr, (rejected != 0).sum(1))


def test_pairwise_accuracy_on_preference_rows(tiny_pair):
  from realign_jax.data import pipeline
  _, p1, p2, fn, forward = tiny_pair
  vocab = vocab_lib.load_vocabulary(None)
  long = "once upon a time there was a king who ruled a small and quiet land"
  rows = [{"prompt": "the weather today", "chosen": "it is sunny", "rejected": "cats"},
          {"prompt": "a story", "chosen": long, "rejected": "the end"},
          {"prompt": "the market", "chosen": "prices rose", "rejected": "prices fell sharply"},
          {"prompt": "news", "chosen": "a vote", "rejected": "the vote was held today"},
          {"prompt": "sport", "chosen": "they won", "rejected": "a draw"}]
  w = jnp.array([1.0, 0.0])  # the first model alone
  out = pairwise.pairwise_accuracy_on_rows(fn, (p1, p2), w, vocab, rows, input_length=8,
                                           target_length=12, batch_size=4)
  # The same answer from the model's own forward pass (rows 0-3, then 1-4).
  enc = lambda field, n, idx: pipeline.fit(
      [vocab_lib.encode(vocab, rows[i][field]) for i in idx], n)
  hits = []
  for idx in ([0, 1, 2, 3], [1, 2, 3, 4]):
    x, c, r = enc("prompt", 8, idx), enc("chosen", 12, idx), enc("rejected", 12, idx)
    lc = _manual_logprob(forward, (p1,), [1.0], x, c) / (c != 0).sum(1)
    lr = _manual_logprob(forward, (p1,), [1.0], x, r) / (r != 0).sum(1)
    hits.append(lc > lr)
  hits = np.concatenate([hits[0], hits[1][3:]])
  assert out["pairwise_accuracy"] == pytest.approx(np.mean(hits))
  assert out["num_pairs"] == 5 and out["num_truncated"] == 1  # the long story
  with pytest.raises(UserError, match="row 2"):
    pairwise.pairwise_accuracy_on_rows(fn, (p1, p2), w, vocab, [rows[0], {"prompt": "x"}],
                                       input_length=8, target_length=12, batch_size=4)


# ---- decode files and the evaluate binary -------------------------------------
WORDS = "the cat sat on a mat and then ran away quickly from dog".split()


def _write_decode(path, lams=(0.0, 1.0), prompts=4, samples=1, seed=0, mutate=None):
  rng = np.random.default_rng(seed)
  rows = []
  for i in range(prompts):
    for j in range(samples):
      for lam in lams:
        resp = " ".join(rng.choice(WORDS, int(rng.integers(1, 12))))
        rows.append({"prompt": f"document {i}", "response": resp, "lam": lam,
                     "prompt_index": i, "sample": j, "kl": float(rng.random()),
                     "log_ratio": float(rng.normal()), "length": len(resp.split()) + 1})
  if mutate:
    mutate(rows)
  with open(path, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  return rows


def _word_count_reward(prompts, responses):
  del prompts
  return [float(len(r.split())) for r in responses]


def test_evaluate_summary(tmp_path):
  dera = tmp_path / "dera.jsonl"
  rows = _write_decode(dera, samples=2)
  sft = tmp_path / "sft.jsonl"
  _write_decode(sft, lams=(None,), samples=2, seed=1)
  refs = tmp_path / "refs.jsonl"
  refs.write_text("".join(json.dumps({"prompt": f"document {i}", "reference": "the cat sat"}) +
                          "\n" for i in range(4)))
  out = tmp_path / "eval.json"
  summary = evaluate_bin.evaluate(decode_files=[str(dera)], output_file=str(out),
                                  compare_file=str(sft), reward=_word_count_reward,
                                  reference_file=str(refs), seed=0)
  doc = json.loads(out.read_text())
  groups = doc["files"][str(dera)]
  assert [g["lam"] for g in groups] == [0.0, 1.0]
  for g in groups:
    sel = [r for r in rows if r["lam"] == g["lam"]]
    assert g["num_rows"] == 8 and g["num_prompts"] == 4
    assert g["kl_exact"] == pytest.approx(np.mean([r["kl"] for r in sel]))
    assert g["kl_log_ratio"] == pytest.approx(np.mean([r["log_ratio"] for r in sel]))
    assert g["reward"] == pytest.approx(np.mean([len(r["response"].split()) for r in sel]))
    assert g["mean_length_tokens"] == pytest.approx(np.mean([r["length"] for r in sel]))
    assert g["rouge"]["rouge1"] == pytest.approx(np.mean(
        [text_metrics.rouge_n(r["response"], "the cat sat", 1) for r in sel]))
    assert set(g["diversity"]) == {f"{k}_{n}" for k in ("distinct", "rep") for n in (1, 2, 3)}
  assert len(doc["win_rates"]) == 2 and doc["win_rates"][0]["num_pairs"] == 8
  assert doc["win_rates"][0]["against_lam"] is None
  assert summary["output_file"] == str(out)
  assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def _nan_lam(rows):
  rows[3]["lam"] = float("nan")


def _drop_kl(rows):
  del rows[2]["kl"]


def _dup(rows):
  rows.append(dict(rows[0]))


@pytest.mark.parametrize("mutate,match", [
    (_drop_kl, r"dera.jsonl row 3: missing field 'kl'"),
    (_nan_lam, r"dera.jsonl row 4: field 'lam' is not finite"),
    (_dup, r"dera.jsonl row 9: duplicates row 1"),
])
def test_evaluate_rejects_bad_rows(tmp_path, mutate, match):
  dera = tmp_path / "dera.jsonl"
  _write_decode(dera, mutate=mutate)
  with pytest.raises(UserError, match=match):
    evaluate_bin.evaluate(decode_files=[str(dera)], output_file=str(tmp_path / "o.json"))
  assert not os.path.exists(tmp_path / "o.json")


def test_evaluate_rejects_bad_comparisons_and_grids(tmp_path):
  dera, other, out = tmp_path / "dera.jsonl", tmp_path / "other.jsonl", str(tmp_path / "o.json")
  _write_decode(dera)
  ev = lambda **kw: evaluate_bin.evaluate(decode_files=[str(dera)], output_file=out,
                                          reward=_word_count_reward, **kw)

  def other_prompt(rows):
    rows[2]["prompt"] = "another document"
  _write_decode(other, lams=(None,), mutate=other_prompt)
  with pytest.raises(UserError, match=r"dera.jsonl row 5 and .*other.jsonl row 3: the prompts"):
    ev(compare_file=str(other))
  _write_decode(other, lams=(None,), prompts=3)
  with pytest.raises(UserError, match="different numbers of rows"):
    ev(compare_file=str(other))
  _write_decode(other, lams=(0.0, 2.0))
  with pytest.raises(UserError, match=r"missing \[1.0\]"):
    ev(compare_file=str(other))
  with pytest.raises(UserError, match="duplicates"):
    ev(lambdas=[0.0, 0.0])
  with pytest.raises(UserError, match="non-finite"):
    ev(lambdas=[0.0, float("inf")])
  with pytest.raises(UserError, match=r"no rows at lam \[0.5\]"):
    ev(lambdas=[0.5])
  (tmp_path / "empty.jsonl").write_text("\n")
  with pytest.raises(UserError, match="empty.jsonl holds no rows"):
    evaluate_bin.evaluate(decode_files=[str(tmp_path / "empty.jsonl")], output_file=out)
  with pytest.raises(UserError, match="needs a judge or a gold reward"):
    evaluate_bin.evaluate(decode_files=[str(dera)], output_file=out, compare_file=str(dera))
  assert not os.path.exists(out)

  def no_kl(rows):
    for r in rows:
      del r["kl"], r["log_ratio"]
  _write_decode(other, lams=(None,), mutate=no_kl)  # e.g. a best-of-n sampler's file
  evaluate_bin.evaluate(decode_files=[str(other)], output_file=out, require_kl=False)
  group = json.load(open(out))["files"][str(other)][0]
  assert "kl_exact" not in group and group["num_rows"] == 4
  # A selected grid keeps its order.
  ev(lambdas=[1.0, 0.0])
  assert [g["lam"] for g in json.load(open(out))["files"][str(dera)]] == [1.0, 0.0]


@pytest.fixture
def clean_gin():
  yield
  gin.clear_config()


@pytest.mark.parametrize("config", ["default.gin", "llm_judge.gin"])
def test_evaluate_configs_parse_and_build(config, clean_gin, tmp_path, monkeypatch):
  for env in (judges.URL_ENV, judges.MODEL_ENV, judges.KEY_ENV):
    monkeypatch.delenv(env, raising=False)
  gin_utils.register()
  try:
    gin.get_configurable("evaluate")
  except ValueError:
    gin.external_configurable(evaluate_bin.evaluate, "evaluate")
  files = [f"configs/evaluate/{config}"]
  bindings = [f"DECODE_FILES = ['{tmp_path}/d.jsonl']", f"OUTPUT_FILE = '{tmp_path}/o.json'",
              f"COMPARE_FILE = '{tmp_path}/c.jsonl'"]
  gin_utils.parse(files, bindings)
  built = gin.get_bindings("evaluate")
  assert built["decode_files"] == [f"{tmp_path}/d.jsonl"]
  assert type(built["reward"]).__name__ == "LengthReward"
  if config == "llm_judge.gin":
    assert isinstance(built["judge"], judges.LLMJudge)
    with pytest.raises(UserError, match="no endpoint URL"):
      built["judge"].check()
    with pytest.raises(UserError, match="COMPARE_FILE"):
      gin_utils.parse(files, bindings[:2])
  else:
    assert built["judge"] is None and built["compare_file"] == f"{tmp_path}/c.jsonl"
  with pytest.raises(UserError, match="DECODE_FILES"):
    gin_utils.parse(files, bindings[1:])


def test_evaluate_binary_end_to_end(tmp_path, capsys):
  dera, sft = tmp_path / "dera.jsonl", tmp_path / "sft.jsonl"
  _write_decode(dera)
  _write_decode(sft, lams=(None,), seed=1)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  base = [sys.executable, "-m", "realign_jax.evaluate",
          "--gin_file=configs/evaluate/default.gin", f"--gin.OUTPUT_FILE='{tmp_path}/o.json'",
          "--gin.L_MIN=2", "--gin.L_MAX=6"]
  ok = subprocess.run(base + [f"--gin.DECODE_FILES=['{dera}']", f"--gin.COMPARE_FILE='{sft}'"],
                      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert ok.returncode == 0, ok.stderr
  assert "win rate" in ok.stdout and os.path.exists(tmp_path / "o.json")
  doc = json.load(open(tmp_path / "o.json"))
  assert doc["judge"]["name"] == "length" and doc["reward"] == "length"
  # NOTE: the refusal through main(argv) in this process (tests.helpers.run_main)
  capsys.readouterr()
  code = run_main(evaluate_bin.main,
                  base[3:] + [f"--gin.DECODE_FILES=['{tmp_path}/missing.jsonl']"])
  out, err = capsys.readouterr()
  line = assert_one_line_error(code, out, err)
  assert line == f"error: decode file {tmp_path}/missing.jsonl not found"
