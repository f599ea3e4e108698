"""Special token ids from the tokenizer's files (Llama's pad 0 = unk, bos 1, eos 2), never 0/1.

The pipeline, the one sampler, the policy's log-probs, model.json and the
refusals (a tokenizer larger than the model, other ids than the model's, a
chat template that does not render) on tiny models.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from realign_jax.checkpoints import manager as ckpt_lib
from realign_jax.checkpoints import run_dir
from realign_jax.checkpoints.hf import load as hf_load
from realign_jax.data import chat
from realign_jax.data import pipeline
from realign_jax.data import vocab as vocab_lib
from realign_jax.decoding import sampler
from realign_jax.plumbing.errors import UserError
from realign_jax.models.api import LanguageModel
from realign_jax.models.config import DecoderConfig, SpecialTokens
from realign_jax.rewards import base as rewards_base
from realign_jax.training import policy as policy_lib
from tests.test_convert import write_tokenizer
from tests.test_hf_import import LLAMA_CONFIG, hf_state, write_hf

LLAMA_IDS = SpecialTokens(pad_id=0, eos_id=2, bos_id=1)
LLAMA_TOKENIZER = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


@pytest.fixture
def llama_vocab(tmp_path):
  path = write_tokenizer(tmp_path / "tok", ["<unk>", "<s>", "</s>"], config=LLAMA_TOKENIZER)
  return vocab_lib.load_vocabulary(path)


def test_ids_come_from_the_tokenizer_files_and_thread_through_the_pipeline(llama_vocab):
  # No pad token: it pads with unk (0); bos and eos as the files name them.
  assert vocab_lib.special_tokens(llama_vocab) == LLAMA_IDS
  assert vocab_lib.special_tokens_of(llama_vocab.path) == LLAMA_IDS
  batch = pipeline.encode_batch(llama_vocab, [{"inputs": "the cat", "targets": "a dog"}],
                                input_length=5, target_length=4)
  # Prompt: BOS first, no EOS (the model continues it); target: EOS, then pad.
  np.testing.assert_array_equal(batch["inputs"], [[1, 3, 4, 0, 0]])
  np.testing.assert_array_equal(batch["targets"], [[8, 9, 2, 0]])
  # T5's ids are unchanged: EOS-terminated prompts, no BOS.
  np.testing.assert_array_equal(pipeline.fit_prompts([[5, 6]], 4), [[5, 6, 1, 0]])
  # Text: stops at eos 2, id 1 is not an eos (a special token, dropped from the text).
  assert vocab_lib.decode(llama_vocab, [3, 1, 4, 2, 5]) == "the cat"
  assert rewards_base.strip_ids([3, 1, 4, 2, 5], eos_id=2, pad_id=0) == [3, 1, 4]


def test_sampler_and_policy_logprobs_with_llama_ids():
  config = DecoderConfig(vocab_size=16, d_model=32, num_heads=2, num_kv_heads=1, head_dim=16,
                         d_ff=48, num_layers=1, tokens=LLAMA_IDS)
  lm = LanguageModel(config)
  # NOTE: init and the teacher-forced pass jitted (eager, every op is compiled on its own)
  params = jax.jit(lambda r: lm.init(r)[0])(jax.random.PRNGKey(0))
  inputs = jnp.asarray(pipeline.fit_prompts([[5, 6, 7], [8], [9, 10, 11, 12]], 6, LLAMA_IDS))
  assert int(inputs[1, 0]) == 1 and int(inputs[1, 2]) == 0  # BOS, then pad
  cfg = sampler.SamplingConfig(max_new_tokens=12)
  out = jax.jit(lambda p, x, r: sampler.generate(lm, p, x, r, cfg, num_samples=4))(
      params, inputs, jax.random.PRNGKey(3))
  tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  for row, n in zip(tokens, lengths):
    assert 0 not in row[:n] and (row[n:] == 0).all()  # pad never sampled, fills the rest
    assert 2 not in row[:n - 1] and (n == 12 or row[n - 1] == 2)  # stops at its first eos 2
  assert any(row[n - 1] == 2 for row, n in zip(tokens, lengths))
  assert any(1 in row[:n - 1] for row, n in zip(tokens, lengths))  # id 1: an ordinary token
  # Teacher-forced log-probs of the sampled rows are the ones the sampler recorded.
  x = jnp.repeat(inputs, 4, axis=0)
  mask = policy_lib.length_mask(out.lengths, tokens.shape[1])
  pol, ref = jax.jit(policy_lib.AnchoredPolicy(lm).logprobs)(params, params, x, out.tokens,
                                                             mask=mask)
  np.testing.assert_allclose(np.asarray(pol), np.asarray(out.logprobs), atol=2e-5)
  np.testing.assert_allclose(np.asarray(ref), np.asarray(out.logprobs), atol=2e-5)
  # An explicit sampler id other than the model's is refused.
  with pytest.raises(UserError, match="SamplingConfig.eos_id=1 but the model's eos_id is 2"):
    sampler.generate(lm, params, inputs, jax.random.PRNGKey(0),
                     sampler.SamplingConfig(max_new_tokens=2, eos_id=1))


def test_model_json_records_the_ids(tmp_path):
  config = DecoderConfig(vocab_size=16, tokens=LLAMA_IDS)
  run_dir.write_model_json(str(tmp_path), config)
  doc = json.loads((tmp_path / "model.json").read_text())
  assert doc["special_tokens"] == {"pad_id": 0, "eos_id": 2, "bos_id": 1}
  assert "tokens" not in doc["config"]
  assert ckpt_lib.read_model_json(str(tmp_path))[0] == config
  # A model.json written before the ids were recorded: T5's.
  del doc["special_tokens"]
  (tmp_path / "model.json").write_text(json.dumps(doc))
  assert ckpt_lib.read_model_json(str(tmp_path))[0].tokens == SpecialTokens()
  with pytest.raises(UserError, match="pad_id=2 is also the eos id"):
    SpecialTokens(pad_id=2, eos_id=2)


def test_size_and_id_mismatches_are_refused_with_both_numbers(tmp_path, llama_vocab):
  big = vocab_lib.load_vocabulary(write_tokenizer(tmp_path / "big", ["<unk>", "<s>", "</s>"],
                                                  config=LLAMA_TOKENIZER, extra_words=20))
  with pytest.raises(UserError, match=r"big/tokenizer.json has 31 token ids but the model has "
                                      r"vocab_size=16"):
    vocab_lib.check_model_tokens(big, DecoderConfig(vocab_size=16, tokens=LLAMA_IDS))
  with pytest.raises(UserError, match=r"tok/tokenizer.json has eos_id=2 but the model records "
                                      r"eos_id=1"):
    vocab_lib.check_model_tokens(llama_vocab, DecoderConfig(vocab_size=16))
  # An HF directory: its config.json's eos disagrees with the tokenizer beside it.
  c = {**LLAMA_CONFIG, "eos_token_id": 3}
  hf = write_hf(tmp_path / "hf", c, hf_state(c))
  write_tokenizer(hf, ["<unk>", "<s>", "</s>"], config=LLAMA_TOKENIZER)
  with pytest.raises(UserError, match=r"hf/config.json has eos_token_id=3 but the tokenizer "
                                      r"beside it has eos_id=2"):
    hf_load.hf_model_config(hf)
  c = {**LLAMA_CONFIG, "eos_token_id": 2}
  hf = write_hf(tmp_path / "hf2", c, hf_state(c))
  write_tokenizer(hf, ["<unk>", "<s>", "</s>"], config=LLAMA_TOKENIZER)
  assert hf_load.hf_model_config(hf).tokens == LLAMA_IDS


def _template_dir(tmp_path, template):
  config = dict(LLAMA_TOKENIZER)
  if template is not None:
    config["chat_template"] = template
  path = write_tokenizer(tmp_path / f"t{len(os.listdir(tmp_path))}", ["<unk>", "<s>", "</s>"],
                         config=config)
  return path, os.path.join(os.path.dirname(path), "tokenizer_config.json")


@pytest.mark.parametrize("template, match", [
    ("{{ raise_exception('system messages are not supported') }}",
     "does not render prompt 0: system messages are not supported"),
    ("{% for m in messages %}{{ m['content'] }", "does not compile"),
    ("{{ messages[0]['content'] + 3 }}", "does not render prompt 0"),
    (None, "has no chat_template"),
])
def test_a_failing_chat_template_is_one_line_naming_the_file(tmp_path, template, match):
  path, config_file = _template_dir(tmp_path, template)
  chat.load_template.cache_clear()
  with pytest.raises(UserError, match=match) as e:
    chat.render_prompts(path, ["the cat"])
  assert config_file in str(e.value) and "\n" not in str(e.value)


def test_chat_template_renders_with_the_tokenizer_tokens(tmp_path):
  path, _ = _template_dir(tmp_path, "{{ bos_token }}[INST] {{ messages[0]['content'] }} [/INST]"
                                    "{% if add_generation_prompt %}>{% endif %}")
  chat.load_template.cache_clear()
  assert chat.render_prompts(path, ["the cat"]) == ["<s>[INST] the cat [/INST]>"]
  vocab = vocab_lib.load_vocabulary(path)
  ids = vocab_lib.encode(vocab, "<s>the cat</s>")
  assert ids == [1, 3, 4, 2]  # special tokens written in the text are their ids
