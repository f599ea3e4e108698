"""The exact KL-regularised optimum: closed form, estimate, limits, curve."""

import math

import numpy as np
import pytest

from realign_jax.plumbing.errors import UserError
from realign_jax.evaluation import optimum as opt

# A tiny enumerable reference: 5 outcomes, rewards in {-1, 0}, P(r = 0) = 0.3.
P = np.array([0.1, 0.2, 0.25, 0.15, 0.3])
R = np.array([0.0, -1.0, -1.0, 0.0, -1.0])


def _kl(q, p):
  return float(np.sum(q * np.log(q / p)))


def _enumerated(beta):
  q = P * np.exp(R / beta)
  q /= q.sum()
  return q


@pytest.mark.parametrize("beta", [0.03, 0.2, 1.0, 7.0])
def test_closed_form_equals_enumeration(beta):
  q = _enumerated(beta)
  o = opt.binary_optimum(float(P[R == 0].sum()), beta)
  assert o["reward"] == pytest.approx(float(q @ R), abs=1e-12)
  assert o["kl"] == pytest.approx(_kl(q, P), abs=1e-12)
  assert o["J"] == pytest.approx(float(q @ R) - beta * _kl(q, P), abs=1e-12)
  assert o["log_Z"] == pytest.approx(math.log(float(P @ np.exp(R / beta))), abs=1e-12)
  assert o["success"] == pytest.approx(float(q[R == 0].sum()), abs=1e-12)


def test_general_two_levels_and_vectorised():
  # Rewards {2, 5}: the same as {-1, 0} shifted by 5 and scaled by 3 with beta scaled by 3.
  b = np.array([0.1, 0.5, 2.0])
  o = opt.binary_optimum(0.4, 3 * b, r_lo=2.0, r_hi=5.0)
  ref = opt.binary_optimum(0.4, b)
  np.testing.assert_allclose(o["reward"], 3 * ref["reward"] + 5, atol=1e-12)
  np.testing.assert_allclose(o["kl"], ref["kl"], atol=1e-12)
  np.testing.assert_allclose(o["J"], 3 * ref["J"] + 5, atol=1e-12)


@pytest.mark.parametrize("beta", [0.05, 0.3, 2.0])
def test_optimum_beats_every_other_policy(beta):
  o = opt.binary_optimum(float(P[R == 0].sum()), beta)
  rng = np.random.default_rng(0)
  for _ in range(200):
    q = rng.dirichlet(np.full(5, 0.5)) + 1e-12
    q /= q.sum()
    assert float(q @ R) - beta * _kl(q, P) <= o["J"] + 1e-12
  assert float(P @ R) <= o["J"]  # doing nothing (KL 0)


def test_the_length_study_numbers():
  # p0 = 12.5%, reward {-1, 0}: J* at beta = 0.2, 0.1, 0.05, 0.025.
  o = opt.binary_optimum(0.125, np.array([0.2, 0.1, 0.05, 0.025]))
  np.testing.assert_allclose(o["J"], [-0.41, -0.21, -0.10, -0.05], atol=0.006)
  assert opt.binary_optimum(0.125, 0.4)["J"] > -0.875  # the SFT model's J = E_ref[r]
  # reward ~ 0 at -log(0.125) = 2.08 nats
  tiny = opt.binary_optimum(0.125, 0.01)
  assert tiny["reward"] > -1e-30 and tiny["kl"] == pytest.approx(2.0794, abs=1e-4)


def test_limits_without_overflow():
  with np.errstate(over="raise"):
    small = opt.binary_optimum(0.125, np.array([1e-6, 1e-300]))
    big = opt.binary_optimum(0.125, np.array([1e6, 1e300, math.inf]))
  for o in (small, big):
    assert all(np.all(np.isfinite(v)) for k, v in o.items() if k != "beta")
  np.testing.assert_allclose(small["kl"], -math.log(0.125), rtol=1e-12)
  np.testing.assert_allclose(small["reward"], 0.0, atol=1e-12)
  np.testing.assert_allclose(small["J"], 0.0, atol=1e-5)
  np.testing.assert_allclose(big["J"], -0.875, atol=1e-6)
  np.testing.assert_allclose(big["kl"], 0.0, atol=1e-6)
  assert big["kl"][-1] == 0.0 and big["J"][-1] == -0.875
  # p0 = 0 or 1: pi_ref is optimal at every beta.
  for p0, r in ((0.0, -1.0), (1.0, 0.0)):
    o = opt.binary_optimum(p0, np.array([1e-3, 1.0, math.inf]))
    np.testing.assert_allclose(o["kl"], 0.0, atol=1e-15)
    np.testing.assert_allclose(o["J"], r, atol=1e-15)
  for bad in (dict(p0=1.2, beta=1.0), dict(p0=0.5, beta=0.0), dict(p0=0.5, beta=-1.0),
              dict(p0=0.5, beta=1.0, r_lo=0.0, r_hi=0.0)):
    with pytest.raises(UserError):
      opt.binary_optimum(**bad)


@pytest.mark.parametrize("beta", [0.02, 0.1, 1.0, math.inf])
def test_estimate_on_the_exact_distribution_equals_the_closed_form(beta):
  # 8 samples: one in the window, p0 = 1/8 exactly.
  r = np.array([0.0] + [-1.0] * 7)
  est = opt.estimate_optimum(r, beta)
  exact = opt.binary_optimum(0.125, beta)
  for k in ("reward", "kl", "J"):
    assert est[k] == pytest.approx(exact[k], abs=1e-12), k


def test_estimate_of_a_three_level_reward_equals_enumeration():
  # p = (1/4, 1/4, 1/2) as 4 equally likely samples with rewards (1, -0.5, 0.3, 0.3).
  r = np.array([1.0, -0.5, 0.3, 0.3])
  for beta in (0.05, 0.4, 3.0):
    q = np.exp(r / beta)
    q /= q.sum()
    est = opt.estimate_optimum(r, beta)
    assert est["reward"] == pytest.approx(float(q @ r), abs=1e-12)
    assert est["kl"] == pytest.approx(_kl(q, np.full(4, 0.25)), abs=1e-12)
    assert est["J"] == pytest.approx(float(q @ r) - beta * _kl(q, np.full(4, 0.25)), abs=1e-12)
  assert opt.estimate_optimum(r, 1e-9)["kl"] == pytest.approx(math.log(4), abs=1e-9)
  assert opt.estimate_optimum(r, 1e12)["J"] == pytest.approx(float(r.mean()), abs=1e-9)


def test_standard_errors_match_the_spread_over_draws():
  levels, probs = np.array([-1.0, 0.0, 0.5]), np.array([0.6, 0.3, 0.1])
  rng = np.random.default_rng(1)
  beta, n = 0.5, 400
  draws = [opt.estimate_optimum(rng.choice(levels, size=n, p=probs), beta) for _ in range(300)]
  for k in ("reward", "kl", "J"):
    spread = np.std([d[k] for d in draws], ddof=1)
    mean_se = np.mean([d[k + "_se"] for d in draws])
    assert mean_se == pytest.approx(spread, rel=0.2), k
  # clustered by prompt: pairs of identical samples double the information it must not claim
  r = rng.choice(levels, size=200, p=probs)
  iid = opt.estimate_optimum(r, beta)
  dup = opt.estimate_optimum(np.repeat(r, 2), beta, groups=np.repeat(np.arange(200), 2))
  assert dup["J_se"] == pytest.approx(iid["J_se"], rel=0.02)
  assert opt.estimate_optimum(np.repeat(r, 2), beta)["J_se"] < 0.75 * iid["J_se"]


def test_small_effective_sample_size_is_flagged():
  r = np.zeros(100)
  r[0] = 5.0
  est = opt.estimate_optimum(r, 0.5)
  assert est["small_ess"] and est["ess"] < 2
  assert not opt.estimate_optimum(r, 50.0)["small_ess"]
  with pytest.raises(UserError, match="finite reward"):
    opt.estimate_optimum([0.0, math.nan], 1.0)


def test_curve_and_reward_at_kl():
  r = np.array([0.0] + [-1.0] * 7)
  c = opt.optimum_curve(r)
  assert c["kind"] == "exact" and c["p0"] == 0.125
  assert c["kl"][0] == 0.0 and c["reward"][0] == -0.875  # beta = inf: pi_ref
  assert np.all(np.diff(c["kl"]) >= 0) and np.all(np.diff(c["reward"]) >= -1e-12)
  assert c["kl"][-1] == pytest.approx(-math.log(0.125), abs=1e-6)
  # J* along the curve is the tangent: reward - beta KL is maximal at that beta's point.
  for i in range(1, len(c["kl"]) - 1, 10):
    js = np.array(c["reward"]) - c["beta"][i] * np.array(c["kl"])
    assert js.max() <= c["J"][i] + 1e-9
  at = opt.reward_at_kl(c, [0.0, 1.0, 50.0])
  assert at[0] == -0.875 and at[2] == 0.0
  o = opt.binary_optimum(0.125, 0.1)
  assert opt.reward_at_kl(c, o["kl"]) == pytest.approx(o["reward"], abs=2e-3)
  g = opt.optimum_curve(np.array([1.0, -0.5, 0.3, 0.3]))
  assert g["kind"] == "estimate" and len(g["small_ess"]) == len(g["kl"])
  one = opt.optimum_curve(np.full(5, -1.0))
  assert one["kl"] == [0.0] and one["reward"] == [-1.0]


# ---- command line ---------------------------------------------------------------------
def test_command_line_closed_form_and_samples(tmp_path, capsys):
  import json
  out = tmp_path / "opt.json"
  assert opt.main(["--p0=0.125", "--betas=inf,0.2,0.1", f"--out={out}"]) == 0
  text = capsys.readouterr().out
  assert "exact (closed form), p0 = 12.50%" in text and "-0.4067" in text
  doc = json.loads(out.read_text())
  assert doc["kind"] == "exact" and doc["rows"][0]["beta"] is None  # inf -> null in JSON
  assert [r["J"] for r in doc["rows"]] == pytest.approx([-0.875, -0.40667, -0.20791], abs=1e-5)
  # samples.jsonl rows of a reference with three reward levels: the estimate
  rows = [{"prompt_index": i // 2, "sample": i % 2, "reward": r}
          for i, r in enumerate([1.0, -0.5, 0.3, 0.3])]
  path = tmp_path / "samples.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  assert opt.main([f"--samples={path}", "--betas=0.4", f"--out={out}"]) == 0
  doc = json.loads(out.read_text())
  assert doc["kind"] == "estimate" and doc["num_samples"] == 4
  assert doc["rows"][0]["J"] == pytest.approx(opt.estimate_optimum([1.0, -0.5, 0.3, 0.3],
                                                                    0.4)["J"])
  # two levels in the samples: the closed form with their p0
  path.write_text("".join(json.dumps(dict(r, reward=float(r["reward"] > 0.5) - 1.0)) + "\n"
                          for r in rows))
  assert opt.main([f"--samples={path}", "--betas=0.1"]) == 0
  assert "p0 = 25.00%" in capsys.readouterr().out
  path.write_text('{"reward": "x"}\n')
  with pytest.raises(UserError, match="line 1 is not a JSON row"):
    opt.main([f"--samples={path}", "--betas=0.1"])
  with pytest.raises(UserError, match="no such file"):
    opt.main([f"--samples={tmp_path / 'none.jsonl'}", "--betas=0.1"])
  with pytest.raises(UserError, match="--betas='0.1,-2'"):
    opt.main(["--p0=0.5", "--betas=0.1,-2"])
  assert not (tmp_path / "none.jsonl").exists()
