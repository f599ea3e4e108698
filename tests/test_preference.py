"""Preference-based alignment: Bradley-Terry reward model, DPO, IPO, synthetic preferences.

Losses against hand-computed values; both families through the one trainer
loop (DPO's first step is exactly log 2 with zero rewards, as policy ==
reference); tiny CPU runs: the reward model separates a synthetic set
(accuracy >= 0.8) and DPO on synthetic preferences from an SFT start raises
held-out preference accuracy above 0.7; bad input gives one clear line.
"""

import json
import logging
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from realign_jax.checkpoints import manager as ckpt_lib
from realign_jax.checkpoints import run_dir
from realign_jax.data import pipeline
from realign_jax.data import preferences
from realign_jax import synthetic_preferences as synth
from realign_jax.data import vocab as vocab_lib
from realign_jax.decoding import sampler
from realign_jax.plumbing.errors import UserError
from realign_jax.inference import preferences as synth_lib
from realign_jax.models.api import LanguageModel
from realign_jax.parallel import partitioning
from realign_jax.rewards import learned
from realign_jax.training import optim, trainer
from realign_jax.training.dpo import DPO, preference_losses, implicit_rewards
from realign_jax.training.reward_model import (RewardModel, bradley_terry_losses,
                                               init_params_sharded, load_trunk_params,
                                               preference_metrics,
                                               sequence_rewards)
from tests.helpers import TINY_BUILTIN, assert_one_line_error, run_main

NEUTRAL = "the a of to in and is it for on with as was at by from this that an be".split()
MARKERS = "good great nice happy clear bright warm kind".split()


def _one_device_mesh():
  return partitioning.create_mesh(1, 1, devices=jax.devices()[:1])


def _train(alg, model_dir, steps, *, lr=3e-3, mesh=None, eval_every=0):
  opt = optim.make_optimizer(name="adamw", learning_rate=lr, schedule="constant",
                             warmup_steps=0, total_steps=max(steps, 1), weight_decay=0.0)
  config = trainer.TrainerConfig(eval_every=eval_every, log_every=1, progress=False,
                                 checkpoint_every=10_000, async_checkpoint=False)
  return trainer.train(algorithm=alg, model_dir=str(model_dir), train_steps=steps,
                       optimizer=opt, mesh=mesh, config=config)


def _metrics(model_dir, split="train"):
  with open(os.path.join(model_dir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["split"] == split]


def _separable_rows(rng, n):
  """Chosen = neutral words plus one marker word; rejected = neutral words only."""
  rows = []
  for _ in range(n):
    k = int(rng.integers(3, 7))
    chosen = list(rng.choice(NEUTRAL, k))
    chosen.insert(int(rng.integers(0, k + 1)), str(rng.choice(MARKERS)))
    rows.append({"prompt": " ".join(rng.choice(NEUTRAL, 6)), "chosen": " ".join(chosen),
                 "rejected": " ".join(rng.choice(NEUTRAL, k))})
  return rows


@pytest.fixture(scope="module")
def separable_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("separable")
  rng = np.random.default_rng(0)
  for split, n in (("train", 512), ("validation", 128), ("test", 8)):
    preferences.write_preference_jsonl(d / f"{split}.jsonl", _separable_rows(rng, n))
  return str(d)


# ---- losses against hand-computed values ----------------------------------------------
def test_bradley_terry_loss_hand_computed():
  rc = jnp.array([1.0, 0.0, -2.0, 3.0])
  rr = jnp.array([0.0, 0.0, 1.0, 1.0])
  want = [math.log(1 + math.exp(-1)), math.log(2), math.log(1 + math.exp(3)),
          math.log(1 + math.exp(-2))]
  np.testing.assert_allclose(bradley_terry_losses(rc, rr), want, rtol=1e-6)
  m = preference_metrics(rc, rr)
  np.testing.assert_allclose(float(m["accuracy"]), 0.5)  # the tie counts as wrong
  np.testing.assert_allclose(float(m["margin"]), (1 + 0 - 3 + 2) / 4, rtol=1e-6)
  np.testing.assert_allclose(float(m["reward_mean"]), (1 + 0 - 2 + 3 + 0 + 0 + 1 + 1) / 8)
  w = preference_metrics(rc, rr, weights=jnp.array([1.0, 0.0, 0.0, 1.0]))
  assert float(w["accuracy"]) == 1.0 and float(w["margin"]) == 1.5


def test_dpo_and_ipo_losses_hand_computed():
  pc, pr = jnp.array([-3.0, -5.0, -2.0]), jnp.array([-4.0, -5.0, -1.0])
  qc, qr = jnp.array([-3.5, -4.0, -2.0]), jnp.array([-3.0, -6.0, -2.0])
  h = np.array([(-3 + 3.5) - (-4 + 3), (-5 + 4) - (-5 + 6), (-2 + 2) - (-1 + 2)])  # 1.5, -2, -1
  beta = 0.5
  np.testing.assert_allclose(preference_losses(pc, pr, qc, qr, beta=beta),
                             np.log1p(np.exp(-beta * h)), rtol=1e-6)
  tau = 0.25  # IPO target 1 / (2 tau) = 2
  np.testing.assert_allclose(preference_losses(pc, pr, qc, qr, beta=tau, loss_type="ipo"),
                             (h - 2.0) ** 2, rtol=1e-6)
  rc, rr = implicit_rewards(pc, pr, qc, qr, beta=beta)
  np.testing.assert_allclose(rc, [0.25, -0.5, 0.0])
  np.testing.assert_allclose(rr, [-0.5, 0.5, 0.5])
  # Policy == reference: every pair costs log 2 (DPO) or 1 / (4 tau^2) (IPO).
  np.testing.assert_allclose(preference_losses(pc, pr, pc, pr, beta=beta), [math.log(2)] * 3)
  np.testing.assert_allclose(preference_losses(pc, pr, pc, pr, beta=tau, loss_type="ipo"),
                             [4.0] * 3)
  with pytest.raises(UserError, match="loss_type"):
    preference_losses(pc, pr, qc, qr, beta=beta, loss_type="hinge")


@pytest.mark.parametrize("family", ["t5", "decoder"])
def test_reward_read_at_response_eos(family):
  """r(x, y) is the value at y's EOS: padding columns and pad-position contents don't matter."""
  lm = LanguageModel(TINY_BUILTIN[family], "scalar")
  # NOTE: random params from numpy: compiling the model's initialisers costs seconds.
  rng = np.random.default_rng(1)
  params = jax.tree_util.tree_map(lambda s: (0.3 * rng.normal(size=s.shape)).astype(s.dtype),
                                  lm.abstract_init()[0])
  inputs = jnp.array([[5, 6, 7, 1, 0], [9, 1, 0, 0, 0]], jnp.int32)
  targets = jnp.array([[11, 12, 1, 0], [13, 1, 0, 0]], jnp.int32)

  @jax.jit
  def run(params):
    longer = jnp.pad(targets, ((0, 0), (0, 3)))
    return (sequence_rewards(lm, params, inputs, targets),
            lm.forward(params, inputs, targets)["values"],
            sequence_rewards(lm, params, inputs, longer))
  r, values, r_longer = run(params)
  np.testing.assert_allclose(r, [values[0, 2], values[1, 1]], rtol=1e-6)
  np.testing.assert_allclose(r_longer, r, atol=1e-5)


def test_eos_terminated_appends_eos_to_cut_responses():
  responses = jnp.array([[7, 8, 1, 0], [7, 8, 9, 4], [5, 0, 0, 0]], jnp.int32)
  lengths = jnp.array([3, 4, 1])
  np.testing.assert_array_equal(learned.eos_terminated(responses, lengths),
                                [[7, 8, 1, 0, 0], [7, 8, 9, 4, 1], [5, 1, 0, 0, 0]])


# ---- both families through the one trainer loop ------------------------------------------
def test_one_step_decoder_sharded(separable_dir, tmp_path):
  """Reward model and IPO (reference precomputed) on the decoder, 4 x 2 mesh.

  T5 runs through the same loop in the longer runs below, which check the
  same first-step identities.
  """
  cfg = TINY_BUILTIN["decoder"]
  mesh = partitioning.create_mesh(4, 2)
  common = dict(data_dir=separable_dir, batch_size=8, input_length=12, target_length=10,
                eval_batch_size=64)
  rm = RewardModel(model=LanguageModel(cfg, "scalar"), **common)
  assert _train(rm, tmp_path / "rm", 2, mesh=mesh)["step"] == 2
  rows = _metrics(tmp_path / "rm")
  assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # zero-initialised head
  assert {"accuracy", "margin", "reward_mean"} <= set(rows[0])
  assert rows[1]["loss"] != rows[0]["loss"] and rows[0]["grad_norm"] > 0

  # The decoder has dropout, which DPO/IPO turn off by default: the policy
  # equals the reference at the first step.
  dpo = DPO(model=LanguageModel(cfg), beta=0.5, loss_type="ipo", precompute_reference=True,
            **common)
  _train(dpo, tmp_path / "dpo", 2, mesh=mesh)
  assert dpo.frozen() is None  # precomputed: no reference params kept
  first = _metrics(tmp_path / "dpo")[0]
  # IPO at policy == reference: (0 - 1 / (2 tau))^2 = 1 for tau = 0.5, every reward 0.
  assert first["loss"] == pytest.approx(1.0, abs=1e-5)
  for k in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
    assert abs(first[k]) < 1e-5
  assert first["grad_norm"] > 0
  # The precomputed columns are what `prepare` computes from the reference params.
  with jax.set_mesh(mesh):
    ref = init_params_sharded(dpo.model, mesh, partitioning.logical_axis_rules(), 0)
    arrays = dpo.train_arrays()
    batch = {k: jnp.asarray(arrays[k][:8]) for k in ("inputs", "chosen", "rejected")}
    prepared, _ = jax.jit(dpo.prepare)(None, batch, None, frozen=ref)
  np.testing.assert_allclose(prepared["ref_chosen"], arrays["ref_chosen"][:8], atol=1e-4)
  np.testing.assert_allclose(prepared["ref_rejected"], arrays["ref_rejected"][:8], atol=1e-4)


# ---- tiny CPU runs -------------------------------------------------------------------
@pytest.fixture(scope="module")
def reward_run(separable_dir, tmp_path_factory):
  model_dir = tmp_path_factory.mktemp("rm")
  alg = RewardModel(model=LanguageModel(TINY_BUILTIN["t5"], "scalar"), data_dir=separable_dir,
                    batch_size=16, input_length=12, target_length=10, eval_batch_size=64)
  _train(alg, model_dir, 50, mesh=_one_device_mesh(), eval_every=50)
  run_dir.write_model_json(str(model_dir), alg.model.config, "scalar")
  return str(model_dir)


def test_reward_model_separates_synthetic_set(reward_run):
  assert _metrics(reward_run)[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
  ev = _metrics(reward_run, "eval")
  assert ev[0]["accuracy"] == 0.0 and ev[-1]["step"] == 50
  assert ev[-1]["accuracy"] >= 0.8, ev[-1]
  assert ev[-1]["margin"] > 0


def test_learned_reward_scores_texts_and_tokens_alike(reward_run, separable_dir):
  reward = learned.LearnedReward(model_dir=reward_run, input_length=12, target_length=10,
                                 batch_size=32)
  rows, _ = preferences.load_preference_jsonl(os.path.join(separable_dir, "validation.jsonl"))
  prompts = [r["prompt"] for r in rows]
  sc = reward.score(prompts, [r["chosen"] for r in rows])
  sr = reward.score(prompts, [r["rejected"] for r in rows])
  assert sc.shape == (len(rows),) and np.mean(sc > sr) >= 0.8

  # Sampler-style arrays (no EOS, cut at the length limit) score as their text does.
  vocab = vocab_lib.load_vocabulary()
  texts = [r["chosen"] for r in rows[:32]]
  ids = [x[:9] for x in vocab_lib.encode_many(vocab, texts)]
  responses = np.zeros((32, 9), np.int32)
  for i, x in enumerate(ids):
    responses[i, :len(x)] = x
  inputs = pipeline.fit(vocab_lib.encode_many(vocab, prompts[:32]), 12)
  lengths = np.array([len(x) for x in ids], np.int32)
  tok = jax.jit(reward.score_tokens)(reward.params(), inputs, responses, lengths)
  np.testing.assert_allclose(tok, reward.score(prompts[:32], texts), atol=1e-5)


@pytest.fixture(scope="module")
def sft_run(tiny_sft_dir):
  """The tiny T5 SFT run shared with the RL tests (conftest.py; the start of DPO) and its
  final params."""
  abstract, _ = LanguageModel(TINY_BUILTIN["t5"]).abstract_init()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree_util.tree_map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), abstract)
  return tiny_sft_dir, ckpt_lib.load_params(tiny_sft_dir, abstract)


def test_reward_model_starts_from_sft_trunk(sft_run):
  sft_dir, sft_params = sft_run
  mesh = _one_device_mesh()
  params = load_trunk_params(sft_dir, LanguageModel(TINY_BUILTIN["t5"], "scalar"), mesh,
                             partitioning.logical_axis_rules())
  assert set(params) == set(sft_params) - {"logits_dense"} | {"scalar_head"}
  for k in set(params) - {"scalar_head"}:
    for a, b in zip(jax.tree_util.tree_leaves(params[k]), jax.tree_util.tree_leaves(sft_params[k])):
      np.testing.assert_array_equal(a, b)
  assert not np.any(np.asarray(params["scalar_head"]["kernel"]))


def test_dpo_on_synthetic_preferences_raises_heldout_accuracy(sft_run, tmp_path_factory):
  """SFT start -> synthetic pairs (shorter preferred) -> DPO: held-out accuracy > 0.7."""
  cfg = TINY_BUILTIN["t5"]
  mesh = _one_device_mesh()
  sft_dir, params = sft_run
  lm = LanguageModel(cfg)
  data_dir = tmp_path_factory.mktemp("synthetic")
  gold = lambda prompts, responses: [-len(r.split()) for r in responses]
  stats = {}
  for split, n in (("train", 256), ("validation", 128), ("test", 8)):
    prompts = [e["inputs"] for e in pipeline.text_examples("builtin_summarize", split, limit=n)]
    stats[split] = synth_lib.build_synthetic_preferences(
        lm=lm, params=params, prompts=prompts, gold_reward=gold,
        output_file=str(data_dir / f"{split}.jsonl"), input_length=32, batch_size=64,
        sampling=sampler.SamplingConfig(max_new_tokens=10))
  assert stats["train"].pairs + stats["train"].skipped == 256
  assert stats["train"].pairs >= 150
  for row in preferences.load_preference_jsonl(data_dir / "validation.jsonl")[0]:
    assert len(row["chosen"].split()) < len(row["rejected"].split())

  model_dir = tmp_path_factory.mktemp("dpo")
  dpo = DPO(model=lm, init_checkpoint=sft_dir, data_dir=str(data_dir),
            batch_size=32, input_length=32, target_length=12, beta=0.1, eval_batch_size=64)
  _train(dpo, model_dir, 40, mesh=mesh, eval_every=40)
  first = _metrics(model_dir)[0]
  # Policy == reference (both the SFT checkpoint) at the first step: loss log 2, rewards 0.
  assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
  for k in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
    assert abs(first[k]) < 1e-5
  ev = _metrics(model_dir, "eval")
  print(f"synthetic pairs: train {stats['train'].pairs} of 256, validation "
        f"{stats['validation'].pairs} of 128; DPO held-out accuracy "
        f"{ev[-1]['rewards/accuracies']:.3f}, margin {ev[-1]['rewards/margins']:.3f}")
  assert ev[0]["rewards/accuracies"] == 0.0 and ev[0]["pairs"] == stats["validation"].pairs
  assert ev[-1]["rewards/accuracies"] > 0.7, ev[-1]
  assert ev[-1]["rewards/margins"] > 0


# ---- synthetic builder: labelling ------------------------------------------------------------
def test_label_pairs_skips_and_counts_ties():
  stats = synth_lib.BuildStats()
  gold = lambda p, r: [len(x) for x in r]
  rows = synth_lib.label_pairs(["p1", "p2", "p3", "p4"], ["aa", "ab", "same", ""],
                           ["b", "ba", "same", "x"], gold, stats)
  assert rows == [{"prompt": "p1", "chosen": "aa", "rejected": "b"}]
  assert (stats.prompts, stats.pairs, stats.ties, stats.identical, stats.empty) == (4, 1, 1, 1, 1)
  with pytest.raises(UserError, match="gold reward returned nan"):
    synth_lib.label_pairs(["p"], ["a"], ["b"], lambda p, r: [1.0, float("nan")], stats)


# ---- bad input --------------------------------------------------------------------------
BAD_ROWS = [
    ({"prompt": "p", "chosen": "a"}, "missing field 'rejected'"),
    ({"prompt": "p", "chosen": "  ", "rejected": "b"}, "field 'chosen' is empty"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "identical"),
]


@pytest.mark.parametrize("bad,message", BAD_ROWS)
def test_bad_preference_rows_name_file_and_row(bad, message, tmp_path, caplog):
  good = {"prompt": "a prompt", "chosen": "yes", "rejected": "no"}
  path = tmp_path / "prefs.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in [good, good, bad, good]) + "\n")
  model = LanguageModel(TINY_BUILTIN["t5"], "scalar")
  alg = RewardModel(model=model, train_file=str(path), batch_size=2)
  with pytest.raises(UserError, match=f"{path} row 3: .*{message}"):
    alg.setup(_one_device_mesh(), partitioning.logical_axis_rules())
  # With the flag, the row is skipped and counted in the log.
  alg = RewardModel(model=model, train_file=str(path), batch_size=2, skip_invalid=True)
  with caplog.at_level(logging.WARNING):
    alg.setup(_one_device_mesh(), partitioning.logical_axis_rules())
  assert len(alg.split_arrays("train")["inputs"]) == 3
  assert "skipped 1 invalid rows" in caplog.text


def test_init_checkpoint_errors(separable_dir, reward_run, tmp_path):
  mesh, rules = _one_device_mesh(), partitioning.logical_axis_rules()
  missing = str(tmp_path / "no_such_run")
  dpo = DPO(model=LanguageModel(TINY_BUILTIN["t5"]), data_dir=separable_dir,
            init_checkpoint=missing)
  with pytest.raises(UserError, match=f"INIT_CHECKPOINT {missing} does not exist"):
    dpo.setup(mesh, rules)
  # A run of another family.
  dpo = DPO(model=LanguageModel(TINY_BUILTIN["decoder"]), data_dir=separable_dir,
            init_checkpoint=reward_run)
  with pytest.raises(UserError, match="holds a t5 model"):
    dpo.setup(mesh, rules)
  # A reward model is not a language model to start DPO from.
  dpo = DPO(model=LanguageModel(TINY_BUILTIN["t5"]), data_dir=separable_dir,
            init_checkpoint=reward_run)
  with pytest.raises(UserError, match="not a language model"):
    dpo.setup(mesh, rules)


def test_train_binary_missing_init_checkpoint_one_line(tmp_path, separable_dir, capsys):
  from realign_jax import train as train_bin
  argv = ["--gin_file=configs/dpo/builtin_tiny.gin", f"--gin.MODEL_DIR='{tmp_path / 'run'}'",
          f"--gin.INIT_CHECKPOINT='{tmp_path / 'nope'}'", f"--gin.PREFERENCE_DIR='{separable_dir}'",
          "--gin.TRAIN_STEPS=1"]
  capsys.readouterr()
  code = run_main(train_bin.main, argv)  # NOTE: in process (tests.helpers.run_main)
  out, err = capsys.readouterr()
  line = assert_one_line_error(code, out, err)
  assert line == f"error: INIT_CHECKPOINT {tmp_path / 'nope'} does not exist"
  ckpts = tmp_path / "run" / "checkpoints"
  assert not ckpts.exists() or not [d for d in os.listdir(ckpts) if d.isdigit()]


def test_builder_writes_no_split_when_one_has_no_usable_pairs(sft_run, tmp_path):
  # The validation prompts all tie under this gold reward: the binary's function must fail
  # before it writes train.jsonl (nothing half-written).
  sft_dir, _ = sft_run
  held = {e["inputs"] for e in pipeline.text_examples("builtin_summarize", "validation",
                                                      limit=4)}
  gold = lambda prompts, responses: [0.0 if p in held else -len(r) for p, r in
                                     zip(prompts, responses)]
  out = tmp_path / "prefs"
  with pytest.raises(UserError, match="no usable pairs from 4 prompts"):
    synth.build_preference_dir(policy_checkpoint=sft_dir, output_dir=str(out), gold_reward=gold,
                               num_prompts={"train": 8, "validation": 4}, input_length=32,
                               batch_size=8, sampling=sampler.SamplingConfig(max_new_tokens=8))
  assert not out.exists() or not any(out.iterdir())
