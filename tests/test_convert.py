"""python -m realign_jax.convert: HF directory <-> run directory, and tokenizer.json vocabularies.

The HF directories are written by hand (test_hf_import's builders: HF names and
layouts, the `safetensors` package's writer); tokenizers by the `tokenizers`
library itself with its own tokenizer.json writer.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy as st_numpy
import tokenizers

from realign_jax import convert
from realign_jax.checkpoints import manager
from realign_jax.checkpoints import run_dir
from realign_jax.checkpoints import safetensors as st_codec
from realign_jax.checkpoints.hf import export as hf_export
from realign_jax.checkpoints.hf import files as hf_files
from realign_jax.checkpoints.hf import load as hf_load
from realign_jax.data import hf_tokenizer
from realign_jax.data import vocab as vocab_lib
from realign_jax.plumbing.errors import UserError
from realign_jax.models.api import LanguageModel
from realign_jax.models.config import SpecialTokens
from tests.test_hf_import import CASES, T5_CONFIG, hf_state, write_hf

WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran"]


def write_tokenizer(directory, specials, *, config=None, extra_words=0):
  """A WordLevel tokenizer.json (specials first, then WORDS) and its tokenizer_config.json."""
  os.makedirs(directory, exist_ok=True)
  words = WORDS + [f"w{i}" for i in range(extra_words)]
  vocab = {t: i for i, t in enumerate(list(specials) + words)}
  unk = "<unk>" if "<unk>" in vocab else None
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token=unk))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.decoder = tokenizers.decoders.WordPiece()  # NOTE: joins words with spaces
  tok.add_special_tokens([t for t in specials])
  tok.save(os.path.join(directory, "tokenizer.json"))
  if config is not None:
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
      json.dump(config, f)
  return os.path.join(directory, "tokenizer.json")


T5_SPECIALS = ["<pad>", "</s>", "<unk>"]
T5_TOKENIZER_CONFIG = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
                       "tokenizer_class": "T5Tokenizer"}


def _run(argv, capsys):
  rc = convert.main([str(a) for a in argv])
  return rc, capsys.readouterr().err


def _abstract(lm):
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=one),
                      lm.abstract_init()[0])


def _leaves_equal(a, b):
  return jax.tree.structure(a) == jax.tree.structure(b) and all(
      np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(np.asarray(x), np.asarray(y))
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _read_hf_dir(path):
  """name -> tensor of an HF directory, through the reference reader (single or sharded)."""
  index = os.path.join(path, "model.safetensors.index.json")
  if not os.path.exists(index):
    return st_numpy.load_file(os.path.join(path, "model.safetensors"))
  with open(index) as f:
    files = sorted(set(json.load(f)["weight_map"].values()))
  out = {}
  for file in files:
    out.update(st_numpy.load_file(os.path.join(path, file)))
  return out


def test_t5_hf_to_run_dir_and_back(tmp_path, capsys):
  # transformers 5.x flan-t5 layout: tied flag, unscaled outputs, separate lm_head.
  c = {**T5_CONFIG, "tie_word_embeddings": True, "scale_decoder_outputs": False}
  sd = hf_state(c)
  hf = write_hf(tmp_path / "hf", c, sd)
  write_tokenizer(hf, T5_SPECIALS, config=T5_TOKENIZER_CONFIG)
  run = tmp_path / "runs" / "t5"
  rc, err = _run(["--hf_dir", hf, "--model_dir", run], capsys)
  assert rc == 0, err
  assert sorted(os.listdir(run)) == ["checkpoints", "model.json", "tokenizer.json",
                                     "tokenizer_config.json"]
  assert not [f for f in os.listdir(run.parent) if f.startswith(".")]
  with open(run / "model.json") as f:
    assert json.load(f)["vocab"]["path"] == str(run / "tokenizer.json")

  config, head = manager.read_model_json(str(run))
  want_config, want = hf_load.load_hf_checkpoint(hf)
  assert (config, head) == (want_config, "lm")
  lm = LanguageModel(config)
  params = manager.load_params(str(run), _abstract(lm))
  assert _leaves_equal(jax.tree.map(np.asarray, params), want)
  # The HF directory used directly (the hook for binaries) gives the same params.
  assert hf_files.is_hf_dir(hf) and not hf_files.is_hf_dir(str(run))
  assert hf_load.hf_model_config(hf) == config
  with open(run / "model.json") as f:
    assert hf_tokenizer.hf_vocabulary(hf)["sha256"] == json.load(f)["vocab"]["sha256"]
  direct = hf_load.hf_params(hf, _abstract(lm))
  assert _leaves_equal(jax.tree.map(np.asarray, direct), want)
  nan = tmp_path / "nan"
  write_hf(nan, c, {**sd, "encoder.final_layer_norm.weight": np.full(32, np.nan, np.float32)})
  with pytest.raises(UserError, match="non-finite values in parameter.*encoder_norm"):
    hf_load.hf_params(str(nan), _abstract(lm))

  # Back to HF, sharded: the tensors are the ones written by hand, bit for bit.
  out = tmp_path / "export"
  rc, err = _run(["--model_dir", run, "--hf_dir", out, "--to_hf", "--max_shard_size", "40KB"],
                 capsys)
  assert rc == 0, err
  names = sorted(os.listdir(out))
  shards = [n for n in names if n.startswith("model-")]
  assert len(shards) >= 3 and "model.safetensors.index.json" in names
  assert {"tokenizer.json", "tokenizer_config.json", "config.json"} <= set(names)
  for s in shards:
    assert os.path.getsize(out / s) <= 40_000 + 8 * 1024  # tensors <= limit, plus the header
  back = _read_hf_dir(out)
  assert sorted(back) == sorted(sd)
  assert all(back[k].dtype == np.float32 and np.array_equal(back[k], sd[k]) for k in sd)
  with open(out / "config.json") as f:
    exported = json.load(f)
  assert exported["scale_decoder_outputs"] is False and exported["torch_dtype"] == "float32"
  config2, params2 = hf_load.load_hf_checkpoint(str(out))
  assert config2 == config and _leaves_equal(params2, want)

  # The destination exists now: refused, and left as it was.
  rc, err = _run(["--model_dir", run, "--hf_dir", out, "--to_hf"], capsys)
  assert rc == 2 and "already exists" in err and "--overwrite" in err
  assert sorted(os.listdir(out)) == names


def test_llama_bfloat16_export_and_decode_equality(tmp_path, capsys):
  c = CASES["mistral_window"]
  sd = hf_state(c)
  hf = write_hf(tmp_path / "hf", c, sd)
  run = tmp_path / "run"
  assert _run(["--hf_dir", hf, "--model_dir", run], capsys)[0] == 0
  config, _ = manager.read_model_json(str(run))
  assert config.sliding_window == 4 and config.num_kv_heads == 1
  lm = LanguageModel(config)
  params = manager.load_params(str(run), _abstract(lm))
  _, want = hf_load.load_hf_checkpoint(hf)
  ids = jnp.asarray(np.random.default_rng(0).integers(1, 97, (2, 9)), jnp.int32)
  tgt = jnp.asarray(np.random.default_rng(1).integers(1, 97, (2, 5)), jnp.int32)
  np.testing.assert_array_equal(np.asarray(lm.forward(params, ids, tgt)["logits"]),
                                np.asarray(lm.forward(want, ids, tgt)["logits"]))

  out = tmp_path / "bf16"
  rc, err = _run(["--model_dir", run, "--hf_dir", out, "--to_hf", "--dtype", "bfloat16"], capsys)
  assert rc == 0, err
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
  back = st_codec.read_safetensors(str(out / "model.safetensors"))
  assert sorted(back) == sorted(sd)
  for k in sd:
    assert back[k].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(back[k], sd[k].astype(ml_dtypes.bfloat16))
  with open(out / "config.json") as f:
    doc = json.load(f)
  assert doc["torch_dtype"] == "bfloat16" and doc["model_type"] == "mistral"


@pytest.mark.parametrize("change, field", [
    ({"feed_forward_proj": "relu"}, "feed_forward_proj='relu'"),
    ({"model_type": "bart"}, "unsupported model_type 'bart'"),
])
def test_unsupported_architecture_writes_nothing(tmp_path, capsys, change, field):
  c = {**T5_CONFIG, **change}
  hf = write_hf(tmp_path / "hf", c, hf_state(T5_CONFIG))
  rc, err = _run(["--hf_dir", hf, "--model_dir", tmp_path / "out" / "run"], capsys)
  assert rc == 2
  lines = err.strip().splitlines()
  assert len(lines) == 1 and str(tmp_path / "hf" / "config.json") in lines[0] and field in lines[0]
  assert not os.path.exists(tmp_path / "out" / "run")
  leftovers = os.listdir(tmp_path / "out") if os.path.exists(tmp_path / "out") else []
  assert leftovers == []


def test_bad_arguments_and_tokenizer_mismatch(tmp_path, capsys):
  c = CASES["llama_gqa"]
  hf = write_hf(tmp_path / "hf", c, hf_state(c))
  rc, err = _run(["--hf_dir", hf, "--model_dir", tmp_path / "r", "--to_hf",
                  "--max_shard_size", "lots"], capsys)
  assert rc == 2 and "--max_shard_size='lots'" in err
  # A tokenizer with more ids than the model's 97 embedding rows.
  write_tokenizer(hf, ["<unk>", "<s>", "</s>"], extra_words=100,
                  config={"bos_token": "<s>", "eos_token": "</s>"})
  rc, err = _run(["--hf_dir", hf, "--model_dir", tmp_path / "r"], capsys)
  assert rc == 2 and "111 token ids" in err and "vocab_size=97" in err
  assert not os.path.exists(tmp_path / "r")
  assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]


def test_help_exits_zero_and_bad_arguments_are_one_line():
  out = subprocess.run([sys.executable, "-m", "realign_jax.convert", "--help"],
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0 and "--to_hf" in out.stdout and "--max_shard_size" in out.stdout
  out = subprocess.run([sys.executable, "-m", "realign_jax.convert", "--hf_dir=x"],
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 2 and out.stdout == ""
  assert out.stderr.strip().splitlines() == [
      "error: the following arguments are required: --model_dir (see --help)"]


# ---- tokenizer.json vocabularies ------------------------------------------------------


def test_tokenizer_json_vocabulary(tmp_path):
  path = write_tokenizer(tmp_path / "t5tok", T5_SPECIALS, config=T5_TOKENIZER_CONFIG)
  vocab = vocab_lib.load_vocabulary(path)
  assert vocab.vocab_size == 3 + len(WORDS)
  assert vocab.special == {"bos": None, "eos": 1, "pad": 0}
  ids = vocab_lib.encode(vocab, "the cat sat")
  assert ids == [3, 4, 5]
  assert vocab_lib.encode_many(vocab, ["a dog", "mat"]) == [[8, 9], [7]]
  assert vocab_lib.decode(vocab, [3, 4, 0, 5, 1, 9]) == "the cat sat"
  # The directory that holds tokenizer.json names the same vocabulary.
  assert vocab_lib.load_vocabulary(tmp_path / "t5tok").vocab_size == vocab.vocab_size
  vocab_lib.check_model_vocab_size(vocab, 11)
  with pytest.raises(UserError, match="has 11 token ids but the model has vocab_size=10"):
    vocab_lib.check_model_vocab_size(vocab, 10)
  # The seqio interface (tf.data tokenization) agrees with the Python one.
  np.testing.assert_array_equal(vocab.encode_tf("the cat sat").numpy(), [3, 4, 5])


def test_tokenizer_json_special_ids_from_files(tmp_path):
  # Llama-style: bos <s> = 1, eos </s> = 2, no pad; ids read from special_tokens_map.json.
  path = write_tokenizer(tmp_path / "llama", ["<unk>", "<s>", "</s>"])
  with open(tmp_path / "llama" / "special_tokens_map.json", "w") as f:
    json.dump({"bos_token": {"content": "<s>", "lstrip": False}, "eos_token": "</s>",
               "unk_token": "<unk>"}, f)
  assert vocab_lib.hf_special_ids(path) == {"bos": 1, "eos": 2, "pad": None}
  # Loaded with its own ids: no pad token, so it pads with its unk (0).
  vocab = vocab_lib.load_vocabulary(path)
  assert vocab_lib.special_tokens(vocab) == SpecialTokens(pad_id=0, eos_id=2, bos_id=1)
  assert vocab_lib.decode(vocab, [1, 3, 0, 4, 2, 5]) == "the cat"
  # Without tokenizer_config.json / special_tokens_map.json the ids are unknown: refused.
  bare = write_tokenizer(tmp_path / "bare", T5_SPECIALS)
  with pytest.raises(UserError, match="eos and pad tokens are unknown"):
    vocab_lib.load_vocabulary(bare)
  # A named token the tokenizer lacks.
  odd = write_tokenizer(tmp_path / "odd", T5_SPECIALS, config={**T5_TOKENIZER_CONFIG,
                                                               "eos_token": "<eos>"})
  with pytest.raises(UserError, match="eos_token '<eos>' is not a token of"):
    vocab_lib.load_vocabulary(odd)


def test_trained_run_dir_round_trip(tmp_path, capsys, tiny_sft_dir):
  """A run directory written by the trainer -> HF -> run directory: the same params."""
  out, back = tmp_path / "hf", tmp_path / "back"
  rc, err = _run(["--model_dir", tiny_sft_dir, "--hf_dir", out, "--to_hf"], capsys)
  assert rc == 0, err
  if run_dir.recorded_vocabulary(tiny_sft_dir) is None:
    # No vocabulary recorded: said, not guessed.
    assert "names no vocabulary" in err
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    # The same run with its (built-in) vocabulary recorded, as the train binary writes it.
    run = tmp_path / "run"
    shutil.copytree(tiny_sft_dir, run)
    with open(run / "model.json") as f:
      doc = json.load(f)
    doc["vocab"] = run_dir.vocabulary_identity(None)
    (run / "model.json").write_text(json.dumps(doc))
    tiny_sft_dir = str(run)
    rc, err = _run(["--model_dir", run, "--hf_dir", out, "--to_hf", "--overwrite"], capsys)
    assert rc == 0, err
  # The built-in sentencepiece vocabulary goes along, as T5's spiece.model.
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "spiece.model"]
  with open(vocab_lib.BUILTIN_VOCAB_PATH, "rb") as a, open(out / "spiece.model", "rb") as b:
    assert a.read() == b.read()
  rc, err = _run(["--hf_dir", out, "--model_dir", back], capsys)
  assert rc == 0, err
  config, _ = manager.read_model_json(tiny_sft_dir)
  assert manager.read_model_json(str(back))[0] == config
  lm = LanguageModel(config)
  a = manager.load_params(tiny_sft_dir, _abstract(lm))
  b = manager.load_params(str(back), _abstract(lm))
  assert _leaves_equal(a, b)
  # The copied vocabulary is recorded with the same hash as the trained run's.
  with open(os.path.join(tiny_sft_dir, "model.json")) as f1, open(back / "model.json") as f2:
    assert json.load(f1)["vocab"]["sha256"] == json.load(f2)["vocab"]["sha256"]


def test_tokenizer_json_through_the_data_pipeline(tmp_path):
  from realign_jax.data import pipeline
  from realign_jax.data import tasks
  path = write_tokenizer(tmp_path / "tok", T5_SPECIALS, config=T5_TOKENIZER_CONFIG)
  corpus = tmp_path / "sft"
  corpus.mkdir()
  for split in ("train", "valid", "test"):
    (corpus / f"{split}.jsonl").write_text(json.dumps(
        {"id": "1", "subreddit": "cat", "title": "the dog", "post": "a cat sat on the mat",
         "summary": "the cat sat"}) + "\n")
  batch = next(pipeline.batch_iterator("tldr_sft", "train", batch_size=1, input_length=24,
                                       target_length=6, seed=0, data_dir=str(corpus),
                                       vocab_path=path))
  # "the cat sat" -> 3 4 5, then eos 1, then pad 0.
  np.testing.assert_array_equal(batch["targets"][0], [3, 4, 5, 1, 0, 0])
  # The seqio task tokenizes the same way in tf.data.
  task = tasks.get_task("tldr_sft", data_dir=str(corpus), vocab_path=path)
  ex = next(iter(task.get_dataset(sequence_length={"inputs": 24, "targets": 6}, split="train",
                                  shuffle=False, use_cached=False)))
  np.testing.assert_array_equal(ex["targets"].numpy(), [3, 4, 5, 1])


@pytest.mark.parametrize("case", ["t5_v5_unscaled", "mistral_window"])
def test_hf_directory_as_a_checkpoint_in_both_layouts(tmp_path, case):
  """manager.read_model_json / load_params take an HF directory directly; a scanned model gets
  the layers stacked, with the logits of the unrolled one, and export unstacks them again."""
  from realign_jax.models import layout
  from realign_jax.models.config import replace
  c = CASES[case]
  hf = write_hf(tmp_path / "hf", c, hf_state(c))
  config, head = manager.read_model_json(hf)
  assert head == "lm" and config == hf_load.hf_model_config(hf)
  unrolled = LanguageModel(config)
  scanned_cfg = replace(config, scan_layers=True)
  scanned = LanguageModel(scanned_cfg)
  p_un = manager.load_params(hf, _abstract(unrolled))
  p_sc = manager.load_params(hf, _abstract(scanned))
  assert layout.detect(p_sc, scanned_cfg) == "scanned"
  assert _leaves_equal(jax.tree.map(np.asarray, layout.to_unrolled(p_sc, scanned_cfg)),
                       jax.tree.map(np.asarray, p_un))
  x = jnp.asarray(np.random.default_rng(0).integers(2, 60, (2, 7)), jnp.int32)
  y = jnp.asarray(np.random.default_rng(1).integers(2, 60, (2, 5)), jnp.int32)
  a = np.asarray(unrolled.forward(p_un, x, y)["logits"])
  b = np.asarray(scanned.forward(p_sc, x, y)["logits"])
  np.testing.assert_allclose(a, b, atol=1e-5)
  tensors = hf_export.hf_state_dict(scanned_cfg, jax.tree.map(np.asarray, p_sc))
  assert sorted(tensors) == sorted(hf_state(c))
