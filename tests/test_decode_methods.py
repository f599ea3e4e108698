"""The decode binary's non-DeRa methods: CD (token-wise, blockwise), TQ* and ARGS.

Run directories are made directly (model.json plus one orbax checkpoint, no
training): a reference and a baseline policy, value models (a zero Q-head, a
zero and a random scalar head, one over another vocabulary) and a reward
model. Each method runs in-process on 3 prompts; the rows are checked against
identities that hold exactly:
  - token-wise CD with V = 0 over the whole vocabulary IS sampling the
    reference (same tokens as DeRa with the reference alone, KL 0);
  - with V = 0 over the top-k (and TQ* with the authors' alpha = 0, i.e. the
    paper's alpha = infinity) it samples p restricted
    to its top-k, q = p / Z on k tokens, so per token KL(q || p) = log q(y) -
    log p(y) = -log Z: each row's exact KL equals its log-ratio;
  - blockwise CD with K = 1 and M = the maximum length is plain sampling
    (token for token `sampler.generate` with the first block's key);
  - ARGS' first-token log-prob equals log softmax over the top-k of
    log p + w r(x, [z]) computed here from the reward model directly.
"""

import dataclasses
import functools
import json
import math
import os
import re

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from realign_jax import decode as decode_bin
from realign_jax.checkpoints import manager as ckpt_lib
from realign_jax.checkpoints import run_dir
from realign_jax.data import vocab as vocab_lib
from realign_jax.decoding import sampler
from realign_jax.decoding.transfer_q import TQConfig
from realign_jax.plumbing.errors import UserError
from realign_jax.evaluation import best_of_n_theory
from realign_jax.inference import components
from realign_jax.inference.methods_cd import BlockwiseCD, TokenwiseCD
from realign_jax.inference.methods_tq import ARGS, TransferQ
from realign_jax.inference.prompts import encode_prompts
from realign_jax.models.api import LanguageModel
from realign_jax.models.config import replace
from realign_jax.rewards.base import Reward
from realign_jax.rewards.length import LengthReward
from tests.helpers import TINY_BUILTIN

CFG = replace(TINY_BUILTIN["t5"], dropout_rate=0.0)
T = 5
SAMPLING = sampler.SamplingConfig(max_new_tokens=T)
PROMPTS = ["Return the number of items in a container.",
           "Open a file and return a stream. Raise OSError upon failure.",
           "Compute the arithmetic mean along the specified axis."]


@functools.lru_cache(maxsize=None)
def _init_fn(config, head):
  # NOTE: one compiled init per model kind: eager init dispatches (and
  # compiles) op by op, several times slower here.
  lm = LanguageModel(config, head)
  return jax.jit(lambda rng: lm.init(rng)[0])


def _run_dir(path, config, seed, head="lm", transform=None):
  params = _init_fn(config, head)(jax.random.PRNGKey(seed))
  if transform is not None:
    params = transform(params)
  run_dir.write_model_json(str(path), config, head)
  ck = ckpt_lib.Checkpointer(str(path), keep=1, async_save=False)
  ck.save(1, {"step": np.int32(1), "params": params})
  ck.close()
  return str(path)


def _model_json_only(path, config):
  """Enough for the checks that refuse a directory before loading any params."""
  run_dir.write_model_json(str(path), config, "scalar")
  return str(path)


def _zeros(params):
  return jax.tree_util.tree_map(jnp.zeros_like, params)


def _random_head(seed, scale):
  def f(params):
    k = params["scalar_head"]["kernel"]
    kernel = scale * jax.random.normal(jax.random.PRNGKey(seed), k.shape, k.dtype)
    return dict(params, scalar_head={"kernel": kernel, "bias": jnp.asarray(0.1, k.dtype)})
  return f


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("decode_methods")
  prompts = root / "prompts.jsonl"
  prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS) + "\n")
  return {
      "ref": _run_dir(root / "ref", CFG, 0), "baseline": _run_dir(root / "baseline", CFG, 1),
      "q_zero": _run_dir(root / "q_zero", CFG, 2, transform=_zeros),
      "v_zero": _run_dir(root / "v_zero", CFG, 3, head="scalar"),
      "v_rand": _run_dir(root / "v_rand", CFG, 4, head="scalar",
                         transform=_random_head(4, 3.0)),
      "v_other": _model_json_only(root / "v_other", replace(CFG, vocab_size=4096)),
      "rm": _run_dir(root / "rm", CFG, 6, head="scalar", transform=_random_head(6, 30.0)),
      "prompts": str(prompts)}


def _decode(dirs, out, method, **kw):
  args = dict(ref_checkpoint=dirs["ref"], output_file=str(out), method=method,
              prompt_file=dirs["prompts"], input_length=32, batch_size=2, sampling=SAMPLING,
              progress=False)
  args.update(kw)
  summary = decode_bin.decode(**args)
  return summary, [json.loads(x) for x in open(out).read().splitlines()]


def _reference_samples(dirs, rng, n=2):
  """`sampler.generate` from the reference, rows (prompt, sample) seeded p * n + j."""
  if "generate" not in dirs:  # one compiled program for every key
    ref = components.load_component(dirs["ref"], *_mesh_and_rules())
    inputs = jnp.asarray(encode_prompts(vocab_lib.load_vocabulary(None), PROMPTS, 32))
    ids = jnp.arange(len(PROMPTS) * n, dtype=jnp.int32)
    fn = jax.jit(lambda p, key: sampler.generate(ref.lm, p, inputs, key, SAMPLING, num_samples=n,
                                                 row_ids=ids))
    dirs["generate"] = lambda key: fn(ref.params, key)
  return dirs["generate"](rng)


def _check_rows(rows, method, n=1):
  assert len(rows) == len(PROMPTS) * n
  assert [(r["prompt_index"], r["sample"]) for r in rows] == [
      (i, j) for i in range(len(PROMPTS)) for j in range(n)]
  for r in rows:
    assert r["method"] == method and r["prompt"] == PROMPTS[r["prompt_index"]]
    assert isinstance(r["response"], str) and isinstance(r["setting"], dict)
    assert 1 <= r["length"] <= T and len(r["tokens"]) == len(r["ref_logprobs"]) == r["length"]
    assert all(lp <= 1e-6 for lp in r["ref_logprobs"])
    if r["kl_kind"] == "exact":
      assert len(r["logprobs"]) == r["length"] and r["kl"] >= -1e-6
      np.testing.assert_allclose(r["log_ratio"], sum(r["logprobs"]) - sum(r["ref_logprobs"]),
                                 atol=1e-4)


# ---- token-wise CD -------------------------------------------------------------------------
def test_cd_token_zero_q_head_over_vocabulary_is_the_reference(dirs, tmp_path):
  summary, rows = _decode(dirs, tmp_path / "cd.jsonl",
                          TokenwiseCD(value_checkpoint=dirs["q_zero"], top_k=0, beta=0.5),
                          num_samples=2)
  _check_rows(rows, "cd_token", n=2)
  assert rows[0]["setting"] == {"beta": 0.5, "top_k": 0, "value_head": "q", "temperature": 1.0}
  for r in rows:
    assert abs(r["kl"]) < 1e-5 and abs(r["log_ratio"]) < 1e-4
    np.testing.assert_allclose(r["logprobs"], r["ref_logprobs"], atol=1e-5)
  assert summary["kl_kind"] == "exact" and abs(summary["mean_kl"]) < 1e-5
  assert summary["tokens"] == sum(r["length"] for r in rows) and summary["tokens_per_s"] > 0
  assert len({tuple(r["tokens"]) for r in rows}) > 3  # real, varied samples
  # the same seeds draw the same tokens as sampling the reference itself
  want = _reference_samples(dirs, jax.random.PRNGKey(0))
  for i, r in enumerate(rows):
    assert r["tokens"] == np.asarray(want.tokens)[i, :r["length"]].tolist()


def test_cd_token_zero_value_over_top_k_is_the_truncated_reference(dirs, tmp_path):
  _, rows = _decode(dirs, tmp_path / "cd.jsonl",
                    TokenwiseCD(value_checkpoint=dirs["v_zero"], top_k=4))
  _check_rows(rows, "cd_token")
  assert rows[0]["setting"]["value_head"] == "scalar"
  for r in rows:
    np.testing.assert_allclose(r["kl"], r["log_ratio"], atol=1e-4)
  assert all(r["kl"] > 1e-3 for r in rows)  # 4 of 2048 tokens hold well under all the mass


# ---- blockwise CD --------------------------------------------------------------------------
def test_cd_block_with_one_candidate_is_plain_sampling(dirs, tmp_path):
  n = 2
  summary, rows = _decode(dirs, tmp_path / "b.jsonl",
                          BlockwiseCD(value_checkpoint=dirs["v_rand"], num_candidates=1,
                                      block_length=T), num_samples=n, seed=3)
  _check_rows(rows, "cd_block", n=n)
  want = _reference_samples(dirs, jax.random.fold_in(jax.random.PRNGKey(3), 0))
  for i, r in enumerate(rows):
    assert r["tokens"] == np.asarray(want.tokens)[i, :r["length"]].tolist()
    np.testing.assert_allclose(r["ref_logprobs"], np.asarray(want.logprobs)[i, :r["length"]],
                               atol=1e-5)
    assert r["blocks"] == 1 and r["kl_bound"] == 0.0 and r["kl_kind"] == "bound"
    assert "kl" not in r and "logprobs" not in r and r["block_latency_s"] > 0
  assert summary["kl_kind"] == "bound" and summary["block_latency_s"] > 0


# ---- Transfer Q* ---------------------------------------------------------------------------
def test_tq_direct_with_alpha_zero_is_the_truncated_reference(dirs, tmp_path):
  # NOTE: the paper's alpha (the KL weight) must be > 0; its limit alpha -> infinity
  # is the authors' alpha = 0.
  tq = TQConfig(top_k=3, horizon=2, alpha=0.0, num_rollouts=1, alpha_convention="authors")
  summary, rows = _decode(dirs, tmp_path / "tq.jsonl",
                          TransferQ(baseline_checkpoint=dirs["baseline"], tq=tq,
                                    reward=LengthReward(min_length=2, max_length=4)))
  _check_rows(rows, "tq_direct")
  s = rows[0]["setting"]
  assert (s["top_k"], s["horizon"], s["alpha"], s["num_rollouts"]) == (3, 2, 0.0, 1)
  assert s["alpha_convention"] == "authors"
  assert s["reward"].startswith("length(min_length=2, max_length=4")
  for r in rows:
    np.testing.assert_allclose(r["kl"], r["log_ratio"], atol=1e-4)
    assert r["kl"] > 1e-3
  assert summary["tokens_per_s"] > 0


def test_tq_indirect_greedy_rows(dirs, tmp_path):
  tq = TQConfig(top_k=3, horizon=2, alpha=2.0, num_rollouts=2, weighting="unnormalized",
                alpha_traj=0.5, mode="direct")  # the method sets the mode
  greedy = dataclasses.replace(SAMPLING, greedy=True)
  _, rows = _decode(dirs, tmp_path / "tq.jsonl",
                    TransferQ(baseline_checkpoint=dirs["baseline"], tq=tq, indirect=True,
                              reward=LengthReward(min_length=2, max_length=4),
                              baseline_reward=LengthReward(min_length=0, max_length=1)),
                    sampling=greedy)
  _check_rows(rows, "tq_indirect")
  s = rows[0]["setting"]
  assert (s["weighting"], s["alpha_traj"], s["temperature"]) == ("unnormalized", 0.5, None)
  assert s["alpha_convention"] == "paper"  # the default
  assert s["baseline_reward"].startswith("length(min_length=0, max_length=1")
  for r in rows:  # greedy: a point mass per step, KL = -sum log p_ref(y_t)
    assert r["logprobs"] == [0.0] * r["length"]
    np.testing.assert_allclose(r["kl"], -sum(r["ref_logprobs"]), rtol=1e-6)


# ---- ARGS ----------------------------------------------------------------------------------
def test_args_with_a_reward_model_first_token_is_exact(dirs, tmp_path):
  k, w = 4, 1.5
  _, rows = _decode(dirs, tmp_path / "a.jsonl",
                    ARGS(reward_checkpoint=dirs["rm"], top_k=k, weight=w))
  _check_rows(rows, "args")
  assert rows[0]["setting"]["reward"].startswith("learned:")
  # first token: q(z) = softmax over the top-k of log p(z) + w r(x, [z])
  from realign_jax.rewards.learned import LearnedReward
  mesh, rules = _mesh_and_rules()
  ref = components.load_component(dirs["ref"], mesh, rules)
  rm = LearnedReward(model_dir=dirs["rm"], input_length=32)
  rm.setup(mesh, rules)
  inputs = jnp.asarray(encode_prompts(vocab_lib.load_vocabulary(None), PROMPTS, 32))

  @jax.jit
  def first_step(params, rm_params):
    cache, first = ref.lm.prefill(params, inputs, T)
    logp = jax.nn.log_softmax(sampler.mask_pad(ref.lm.step(params, first, cache)[0]), -1)
    top_lp, top_idx = jax.lax.top_k(logp, k)
    n = len(PROMPTS)
    r = rm.score_tokens(rm_params, jnp.repeat(inputs, k, 0), top_idx.reshape(-1, 1),
                        jnp.ones((n * k,), jnp.int32)).reshape(n, k)
    return top_lp, top_idx, r
  top_lp, top_idx, r = first_step(ref.params, rm.params())
  assert float(jnp.std(r)) > 1e-2  # the reward matters
  logq = np.asarray(jax.nn.log_softmax(top_lp + w * r, axis=-1))
  for i, row in enumerate(rows):
    j = np.asarray(top_idx[i]).tolist().index(row["tokens"][0])
    np.testing.assert_allclose(row["logprobs"][0], logq[i, j], atol=1e-4)
    np.testing.assert_allclose(row["ref_logprobs"][0], float(top_lp[i, j]), atol=1e-5)


def _mesh_and_rules():
  from realign_jax.parallel import partitioning
  return partitioning.create_mesh(), partitioning.logical_axis_rules()


# ---- bad input -----------------------------------------------------------------------------
class NanReward(Reward):
  name = "nan"

  def score(self, prompts, responses):
    return np.full((len(prompts),), np.nan, np.float32)

  def score_tokens(self, params, inputs, responses, lengths):
    return jnp.full((responses.shape[0],), jnp.nan, jnp.float32)


class LateNanReward(Reward):
  """Finite on the one-token probes, NaN once a response has 2 tokens."""
  name = "late_nan"

  def score(self, prompts, responses):
    raise NotImplementedError

  def score_tokens(self, params, inputs, responses, lengths):
    return jnp.where(lengths >= 2, jnp.nan, 0.0).astype(jnp.float32)


LEN = LengthReward(min_length=2, max_length=4)
BAD = [
    (TokenwiseCD, {"value_checkpoint": "v_other"},
     "value model .*v_other has vocabulary size 4096 but the policy has 2048"),
    (TokenwiseCD, {"value_checkpoint": "v_zero", "top_k": 5000},
     "TokenwiseCD.top_k .* = 5000 is larger than the vocabulary \\(2048 tokens\\)"),
    (TokenwiseCD, {"value_checkpoint": "v_zero", "top_k": 0}, "needs a Q-head value model"),
    (TokenwiseCD, {"value_checkpoint": "q_zero", "beta": 0.0}, "TokenwiseCD.beta must be"),
    (TokenwiseCD, {}, "needs TokenwiseCD.value_checkpoint"),
    (BlockwiseCD, {"value_checkpoint": "v_zero", "block_length": 0},
     "BlockwiseCD.block_length \\(M"),
    (BlockwiseCD, {"value_checkpoint": "v_zero", "num_candidates": 0},
     "BlockwiseCD.num_candidates \\(K"),
    (TransferQ, {"baseline_checkpoint": "baseline", "reward": LEN,
                 "tq": TQConfig(top_k=2, horizon=0)}, "horizon H must be an integer >= 1"),
    (TransferQ, {"baseline_checkpoint": "baseline", "reward": LEN,
                 "tq": TQConfig(top_k=4096)}, "larger than the vocabulary"),
    (TransferQ, {"baseline_checkpoint": "baseline", "reward": LEN,
                 "tq": TQConfig(top_k=2, alpha=0.0)},
     "alpha must be a finite number > 0 under alpha_convention 'paper'"),
    (TransferQ, {"baseline_checkpoint": "v_other", "reward": LEN},
     "baseline model has vocabulary size 4096"),
    (TransferQ, {"baseline_checkpoint": "baseline"}, "needs TransferQ.reward_checkpoint"),
    (TransferQ, {"baseline_checkpoint": "baseline", "reward": LEN, "indirect": True,
                 "baseline_reward": LengthReward(min_length=2, max_length=4)},
     "two different rewards"),
    (TransferQ, {"baseline_checkpoint": "baseline", "reward_checkpoint": "rm", "indirect": True,
                 "baseline_reward_checkpoint": "rm"}, "two different rewards"),
    (TransferQ, {"baseline_checkpoint": "baseline", "reward": LEN,
                 "baseline_reward": LengthReward(min_length=0, max_length=1)},
     "read by indirect Transfer Q\\* only"),
    (ARGS, {"reward_checkpoint": "ref"}, "output_head 'lm', not a reward model"),
    (ARGS, {"reward_checkpoint": "v_other"}, "reward model .* has vocabulary size 4096"),
    (ARGS, {"reward": LEN, "reward_checkpoint": "rm"}, "give ARGS.reward or .* not both"),
    (ARGS, {"reward": NanReward()}, "reward nan returned a non-finite score"),
    (ARGS, {"reward": LateNanReward(), "top_k": 2},
     "non-finite score while decoding prompt 0"),
    ("args", {}, "names a method; give the method object instead"),
    (None, {}, "decode.method must be a decoding method"),
]


@pytest.mark.parametrize("method,kw,match", BAD, ids=[
    f"{getattr(m, '__name__', m)}-{i}" for i, (m, _, _) in enumerate(BAD)])
def test_bad_input_is_refused_before_writing(dirs, tmp_path, method, kw, match):
  kw = {k: dirs.get(v, v) if isinstance(v, str) else v for k, v in kw.items()}
  out = tmp_path / "out.jsonl"
  with pytest.raises(UserError, match=match) as e:
    _decode(dirs, out, method(**kw) if isinstance(method, type) else method)
  assert "\n" not in str(e.value)
  assert not [f for f in os.listdir(tmp_path) if f.startswith("out.jsonl")]


# ---- a config through the binary's main --------------------------------------------------
def test_cd_block_config_through_main_reports_blocks_bound_and_latency(dirs, tmp_path, capsys):
  """configs/decode/cd_block_builtin_tiny.gin (K = 4, M = 4) on 3 built-in prompts, T = 6."""
  k, m = 4, 4
  out = tmp_path / "cfg.jsonl"
  argv = ["--gin_file=configs/decode/cd_block_builtin_tiny.gin",
          f"--gin.REF_CHECKPOINT='{dirs['ref']}'", f"--gin.VALUE_CHECKPOINT='{dirs['v_rand']}'",
          f"--gin.OUTPUT_FILE='{out}'", "--gin.decode.max_prompts=3",
          "--gin.decode.batch_size=2", "--gin.decode.input_length=32",
          "--gin.SamplingConfig.max_new_tokens=6", "--gin.decode.progress=False"]
  try:
    assert decode_bin.main(argv) == 0
  finally:
    gin.clear_config()
  printed = capsys.readouterr().out
  assert "per-block latency" in printed and "tokens/s" in printed
  rows = [json.loads(x) for x in out.read_text().splitlines()]
  assert len(rows) == 3 and {r["method"] for r in rows} == {"cd_block"}
  assert rows[0]["setting"] == {"num_candidates": k, "block_length": m, "value_head": "scalar",
                                "temperature": 1.0}
  for r in rows:
    assert 1 <= r["length"] <= 6 and len(r["ref_logprobs"]) == r["length"]
    assert r["blocks"] == math.ceil(r["length"] / m)
    np.testing.assert_allclose(r["kl_bound"], r["blocks"] * (math.log(k) - (k - 1) / k))
    np.testing.assert_allclose(r["kl_bound"], r["blocks"] * best_of_n_theory.kl_bound(k))
    # the estimator, block by block from the emitted tokens' log-probs under p
    lp = np.asarray(r["ref_logprobs"])
    want = sum(best_of_n_theory.kl_estimator(math.exp(lp[i:i + m].sum()), k)
               for i in range(0, len(lp), m))
    np.testing.assert_allclose(r["kl_estimate"], want, rtol=1e-9)
    assert 0.0 <= r["kl_estimate"] <= r["kl_bound"] + 1e-9
    assert r["block_latency_s"] > 0 and "kl" not in r
  # batches of 2 and 1 prompts: each proposes until its longest row is done
  lat = [r["block_latency_s"] for r in rows]
  assert lat[0] == lat[1]
  rounds = max(r["blocks"] for r in rows[:2]) + rows[2]["blocks"]
  mean_lat = (lat[0] * max(r["blocks"] for r in rows[:2]) + lat[2] * rows[2]["blocks"]) / rounds
  shown = float(re.search(r"per-block latency ([0-9.]+) ms", printed).group(1))
  assert abs(shown - mean_lat * 1e3) <= 0.051


# ---- the one batch loop on several processes ----------------------------------------------
def test_two_processes_split_the_batches_and_write_one_process_rows(dirs, tmp_path, monkeypatch):
  """ARGS on 3 prompts in batches of 2 as processes 1 then 0 of 2, the gather simulated.

  Process 1 decodes batch 1 (prompt 2) alone; its round outputs are handed to
  process 0 (batch 0, prompts 0 and 1) as the gather would, and process 0
  writes exactly the rows of a one-process run.
  """
  from realign_jax.parallel import multihost
  _, one = _decode(dirs, tmp_path / "one.jsonl", ARGS(reward=LEN, top_k=2))
  sent = []

  def gather_on_1(tree):  # process 1: records what it sends, gets its own back twice
    sent.append(tree)
    return jax.tree_util.tree_map(lambda a: np.stack([a, a]), tree)

  monkeypatch.setattr(multihost, "process_slot", lambda: (2, 1))
  monkeypatch.setattr(multihost, "gather", gather_on_1)
  on_1 = decode_bin.decode(ref_checkpoint=dirs["ref"], output_file=str(tmp_path / "p1.jsonl"),
                           method=ARGS(reward=LEN, top_k=2), prompt_file=dirs["prompts"],
                           input_length=32, batch_size=2, sampling=SAMPLING, progress=False)
  assert on_1["prompts_here"] == 1
  from_1 = iter(sent)
  monkeypatch.setattr(multihost, "process_slot", lambda: (2, 0))
  monkeypatch.setattr(multihost, "gather", lambda tree: jax.tree_util.tree_map(
      lambda a, b: np.stack([a, b]), tree, next(from_1)))
  summary, two = _decode(dirs, tmp_path / "two.jsonl", ARGS(reward=LEN, top_k=2))
  assert summary["prompts_here"] == 2 and next(from_1, None) is None
  assert [r["prompt_index"] for r in two] == [0, 1, 2]
  assert two == one


def test_policy_sampling_on_two_processes_gives_the_one_process_rows(dirs, monkeypatch):
  """PolicySampling (the studies' method) with a reward, 3 prompts in batches of 1, P = 2.

  Process 1 has no batch in the last round (zeros of the scored outputs stand in);
  process 0, handed what process 1 sent, makes exactly the one-process rows.
  """
  from realign_jax.inference import loop
  from realign_jax.inference.methods_policy import PolicySampling
  from realign_jax.parallel import multihost
  mesh, rules = _mesh_and_rules()
  ref = components.load_component(dirs["ref"], mesh, rules)
  pol = components.load_component(dirs["baseline"], mesh, rules)
  vocab = vocab_lib.load_vocabulary(None)
  inputs = encode_prompts(vocab, PROMPTS, 32)

  def sample():
    method = PolicySampling(ref.lm, pol.params, reference=ref.params, reward=LEN)
    return loop.sample(method, inputs, vocab, num_samples=2, batch_size=1, seed=0,
                       sampling=SAMPLING, mesh=mesh, rules=rules, progress=False)
  one = sample()
  assert [(r["prompt_index"], r["sample"]) for r in one] == [(p, j) for p in range(3)
                                                             for j in range(2)]
  assert list(one[0]) == ["prompt_index", "sample", "lam", "tokens", "length", "reward", "kl",
                          "log_ratio", "response"]
  for r in one:  # the length reward of the response's tokens, EOS not counted
    assert r["length"] == len([t for t in r["tokens"] if t != 1])
    assert r["reward"] == pytest.approx(LEN.score_ids(["p"], [r["response"]], [r["tokens"]])[0])
  sent = []

  def gather_on_1(tree):
    sent.append(tree)
    return jax.tree_util.tree_map(lambda a: np.stack([a, a]), tree)

  monkeypatch.setattr(multihost, "process_slot", lambda: (2, 1))
  monkeypatch.setattr(multihost, "gather", gather_on_1)
  sample()
  from_1 = iter(sent)
  monkeypatch.setattr(multihost, "process_slot", lambda: (2, 0))
  monkeypatch.setattr(multihost, "gather", lambda tree: jax.tree_util.tree_map(
      lambda a, b: np.stack([a, b]), tree, next(from_1)))
  assert sample() == one


def test_the_flat_form_is_refused_with_one_line(dirs, tmp_path):
  """The flat settings (`decode.cd_beta`, ...) are gone: gin refuses them at parse time."""
  out = tmp_path / "out.jsonl"
  base = ["--gin_file=configs/decode/cd_token_builtin_tiny.gin",
          f"--gin.REF_CHECKPOINT='{dirs['ref']}'", f"--gin.VALUE_CHECKPOINT='{dirs['q_zero']}'",
          f"--gin.OUTPUT_FILE='{out}'"]
  for extra, match in ((["--gin.decode.cd_beta=2.0"], "gin: .*cd_beta"),
                       (["--gin.decode.method='cd_token'"], "names a method"),
                       (["--gin.TokenwiseCD.beta=0.0"], "TokenwiseCD.beta must be")):
    try:
      with pytest.raises(UserError, match=match) as e:
        decode_bin.main(base + extra)
    finally:
      gin.clear_config()
    assert re.search(match, str(e.value).splitlines()[0])
  assert not os.path.exists(out)
