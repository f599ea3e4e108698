"""configs/decode/chat_dera.gin end to end: DeRa between two chat models in HF format.

Two tiny random Llama-style checkpoints (config.json + model.safetensors, written
as test_hf_import writes them) share a tokenizer.json built with the `tokenizers`
library (<unk> = 0, <s> = 1, </s> = 2: Llama's ids, so pad is unk 0) and a
tokenizer_config.json with Zephyr's chat template. The binary runs the recipe
as a subprocess; the models alone are decoded in-process with the same seed.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from realign_jax import decode as decode_bin
from realign_jax.inference.methods_dera import DeRa
from realign_jax.decoding import sampler
from tests.helpers import subprocess_xla_flags
from tests.test_convert import WORDS, write_tokenizer
from tests.test_hf_import import LLAMA_CONFIG, hf_state, write_hf

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Zephyr's chat template as zephyr-7b-beta's tokenizer_config.json stores it.
ZEPHYR_TEMPLATE = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n"
    "{% endfor %}")
SPECIALS = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
TOKENIZER_CONFIG = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                    "pad_token": "</s>",  # NOTE: as Zephyr's: pad = eos, so it pads with unk
                    "chat_template": ZEPHYR_TEMPLATE}
VOCAB_SIZE = 16  # the tokenizer's 5 specials + 8 words + 3: a small vocabulary, so eos is sampled
CHAT = {**LLAMA_CONFIG, "vocab_size": VOCAB_SIZE, "bos_token_id": 1, "eos_token_id": 2}
PROMPTS = ["the cat sat on a mat", "a dog ran", "the dog sat"]
LAMBDAS = [0.0, 0.5, 1.0]
T = 12


def write_chat_model(path, seed):
  """A tiny random Llama-style chat model in HF format, with its tokenizer files."""
  hf = write_hf(path, CHAT, hf_state(CHAT, seed))
  tok = write_tokenizer(path, SPECIALS, config=TOKENIZER_CONFIG,
                        extra_words=VOCAB_SIZE - len(SPECIALS) - len(WORDS))
  return hf, tok


@pytest.fixture(scope="module")
def chat_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("chat")
  sft, tok = write_chat_model(root / "sft", 0)
  dpo, _ = write_chat_model(root / "dpo", 1)
  prompts = root / "prompts.jsonl"
  prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
  return {"sft": sft, "dpo": dpo, "vocab": tok, "prompts": str(prompts), "root": root}


def _alone(chat_dirs, model_dir, out):
  """The recipe's settings with one model and no aligned one (lambda irrelevant)."""
  decode_bin.decode(ref_checkpoint=model_dir, method=DeRa(), output_file=str(out),
                    vocab_path=chat_dirs["vocab"],
                    prompt_file=chat_dirs["prompts"], chat_template=True, input_length=16,
                    batch_size=2, max_prompts=None, sampling=sampler.SamplingConfig(
                        max_new_tokens=T), seed=0, progress=False)
  return [json.loads(x) for x in out.read_text().splitlines()]


def test_chat_dera_recipe_through_the_binary(chat_dirs, tmp_path):
  out = tmp_path / "dera.jsonl"
  cmd = [sys.executable, "-m", "realign_jax.decode", "--gin_file=configs/decode/chat_dera.gin",
         f"--gin.REF_CHECKPOINT='{chat_dirs['sft']}'",
         f"--gin.ALIGNED_CHECKPOINT='{chat_dirs['dpo']}'", f"--gin.VOCAB='{chat_dirs['vocab']}'",
         f"--gin.PROMPT_FILE='{chat_dirs['prompts']}'", f"--gin.OUTPUT_FILE='{out}'",
         f"--gin.LAMBDAS={LAMBDAS}", "--gin.decode.input_length=16", "--gin.decode.batch_size=2",
         "--gin.decode.progress=False", f"--gin.SamplingConfig.max_new_tokens={T}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=subprocess_xla_flags())
  proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(x) for x in out.read_text().splitlines()]
  # One row per prompt and lambda, in (prompt, lambda) order.
  assert [(r["prompt_index"], r["lam"]) for r in rows] == [
      (i, lam) for i in range(len(PROMPTS)) for lam in LAMBDAS]
  for r in rows:
    # The prompt is Zephyr's rendering of one user message with the generation prompt.
    assert r["prompt"] == f"<|user|>\n{PROMPTS[r['prompt_index']]}</s>\n<|assistant|>\n"
    toks = r["tokens"]
    assert len(toks) == r["length"] and 0 not in toks  # pad (= unk 0) is never sampled
    assert 2 not in toks[:-1]  # the response ends at its first eos (id 2) ...
    assert r["length"] == T or toks[-1] == 2
  # ... eos 2 is sampled, and id 1 (T5's eos, here <s>) is an ordinary token inside a response.
  assert any(r["tokens"][-1] == 2 for r in rows)
  assert any(1 in r["tokens"][:-1] for r in rows)
  # lambda = 0 and lambda = 1 rows are each model decoded alone with the same seed.
  for lam, model in ((0.0, "sft"), (1.0, "dpo")):
    alone = _alone(chat_dirs, chat_dirs[model], tmp_path / f"{model}.jsonl")
    swept = [r for r in rows if r["lam"] == lam]
    assert [r["tokens"] for r in alone] == [r["tokens"] for r in swept]
    assert [r["prompt"] for r in alone] == [r["prompt"] for r in swept]
    np.testing.assert_allclose([x for r in alone for x in r["logprobs"]],
                               [x for r in swept for x in r["logprobs"]], atol=1e-5)
  assert os.path.isfile(f"{out}.config.gin")
