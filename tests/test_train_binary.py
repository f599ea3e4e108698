"""The training binary end to end (`python -m realign_jax.train`), its bad input (through
its main(argv), in process) and every gin file (parsed in process).

The binary's runs as a user starts them are few: the shared uninterrupted run of the
tiny SFT config (conftest.train_run, shared with tests/test_multihost.py), whose
files and output are checked here, and a run killed with SIGKILL and resumed, which
must end equal to it. They share the test run's compilation cache. (A SIGTERM, the
preemption signal, is tested on one of two processes in tests/test_multihost.py.)
"""

import json
import os
import re
import shutil
import signal
import time

import gin
import jax
import numpy as np
import pytest

from realign_jax.plumbing import gin_utils
from realign_jax import train as train_bin
from realign_jax.checkpoints import manager as ckpt_lib
from realign_jax.plumbing.errors import UserError
from realign_jax.models import sizes
from realign_jax.models.api import LanguageModel, count_params
from realign_jax.models.config import DecoderConfig, T5Config
from realign_jax.training import trainer as trainer_lib
from tests.helpers import (REPO_ROOT, TINY_BUILTIN, TRAIN_RUN_DEVICES, TRAIN_RUN_STEPS,
                           BinaryRun, assert_one_line_error, binary_env, load_run_params,
                           run_main, train_run_args)

SFT_GIN = os.path.join(REPO_ROOT, "configs", "sft", "builtin_tiny.gin")
# How far below the unigram model's cross-entropy the tiny SFT run must end (nats per token).
SFT_BELOW_UNIGRAM = 0.1


def _model_dir_arg(path) -> str:
  return f"--gin.MODEL_DIR='{path}'"


def _checkpoint_steps(model_dir) -> list:
  root = os.path.join(model_dir, ckpt_lib.CHECKPOINT_SUBDIR)
  if not os.path.isdir(root):
    return []
  return sorted(int(d) for d in os.listdir(root) if d.isdigit())


def _metrics(model_dir) -> list:
  path = os.path.join(model_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except ValueError:
        pass  # a line being written right now
  return rows


def _train_steps(rows) -> list:
  return [r["step"] for r in rows if r["split"] == "train"]


def _wait_for(predicate, run: BinaryRun, what: str, timeout: float = 300.0, poll: float = 0.02):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if predicate():
      return
    if not run.running():
      pytest.fail(f"the run ended before {what}:\n{run.wait().describe()}")
    time.sleep(poll)
  pytest.fail(f"timed out waiting for {what}")


def _max_abs_diff(a, b) -> float:
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  return max(float(np.max(np.abs(x - y)))
             for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def _rows_up_to(rows, step):
  return [r for r in rows if r["step"] <= step]


# ---- the shared run, end to end ------------------------------------------------------
def test_binary_writes_its_run_directory_and_prints_one_line(train_run):
  model_dir = train_run.model_dir
  rows = _metrics(model_dir)
  assert _train_steps(rows) == list(range(1, TRAIN_RUN_STEPS + 1))
  evals = {r["step"]: r["loss"] for r in rows if r["split"] == "eval"}
  assert sorted(evals) == [0, TRAIN_RUN_STEPS] and evals[TRAIN_RUN_STEPS] < evals[0], evals
  with open(os.path.join(model_dir, "samples.jsonl")) as f:
    samples = [json.loads(line) for line in f]
  assert samples and all(s["sample"].strip() and s["prompt"] for s in samples)
  config, _ = ckpt_lib.read_model_json(model_dir)
  assert config == TINY_BUILTIN["t5"]  # gin/models/t5_tiny.gin with tests.helpers.TINY_T5_GIN
  with open(os.path.join(model_dir, "config.gin")) as f:
    operative = f.read()
  assert "SFT.batch_size = 8" in operative and f"TRAIN_STEPS = {TRAIN_RUN_STEPS}" in operative
  for line in ("SFT.input_length = 32", "SFT.target_length = 8", "SFT.max_eval_examples = 16",
               "SFT.task = 'builtin_summarize'", "SFT.eval_split = 'validation'",
               "SFT.vocab_path = None", "make_optimizer.name = 'adamw'"):
    assert line in operative, line
  assert any(n.startswith("events.out.tfevents") for n in os.listdir(os.path.join(model_dir, "tb")))
  assert _checkpoint_steps(model_dir)[-1] == TRAIN_RUN_STEPS
  assert f"done: step {TRAIN_RUN_STEPS}" in train_run.stdout
  # stderr holds the progress bar and nothing else (no native start-up logging)
  noise = [seg for seg in re.split(r"[\r\n]+", train_run.stderr)
           if seg.strip() and not seg.startswith("sft:")]
  assert noise == [], train_run.stderr


# ---- interruption ---------------------------------------------------------------
@pytest.fixture(scope="module")
def killed(train_run, tmp_path_factory):
  """The shared run's command into a new directory: SIGKILL after a checkpoint, then
  resumed to the end. NOTE: started after the shared run, so its programs are cached."""
  root = tmp_path_factory.mktemp("killed")
  model_dir = root / "run"
  env = binary_env(TRAIN_RUN_DEVICES)
  obs = {"dir": model_dir}
  run = BinaryRun(train_run_args(model_dir), env=env, cwd=REPO_ROOT, log_prefix=str(root / "kill"))
  try:
    _wait_for(lambda: any(s >= 3 for s in _checkpoint_steps(model_dir)), run,
              "a checkpoint of step >= 3")
    os.kill(run.proc.pid, signal.SIGKILL)
  finally:
    if run.running():
      run.proc.kill()  # only the process this fixture started
  obs["kill"] = run.wait()
  obs["killed_ckpt"] = max(_checkpoint_steps(model_dir))
  obs["killed_rows"] = _metrics(model_dir)
  obs["final"] = BinaryRun(train_run_args(model_dir), env=env, cwd=REPO_ROOT,
                           log_prefix=str(root / "resumed")).wait()
  obs["final_rows"] = _metrics(model_dir)
  return obs


def test_sigkill_then_resume_equals_uninterrupted_run(train_run, killed):
  kill = killed["kill"]
  assert kill.returncode == -signal.SIGKILL, kill.describe()
  killed_ckpt = killed["killed_ckpt"]
  assert 3 <= killed_ckpt < TRAIN_RUN_STEPS
  final = killed["final"]
  assert final.returncode == 0, final.describe()

  # Each step logged exactly once, and the rows up to the checkpoint the
  # resumed run started from are the killed run's own (it did not restart).
  rows = killed["final_rows"]
  assert _train_steps(rows) == list(range(1, TRAIN_RUN_STEPS + 1))
  assert _rows_up_to(rows, killed_ckpt) == _rows_up_to(killed["killed_rows"], killed_ckpt)

  reference = train_run.model_dir
  diff = _max_abs_diff(load_run_params(killed["dir"]), load_run_params(reference))
  assert diff <= 1e-6, diff
  ref_losses = [r["loss"] for r in _metrics(reference)]
  np.testing.assert_allclose([r["loss"] for r in rows], ref_losses, rtol=0, atol=1e-6)


# ---- bad input: main(argv) in this process ------------------------------------------
def _snapshot(path):
  files = {}
  for root, _, names in os.walk(path):
    for name in names:
      p = os.path.join(root, name)
      st = os.stat(p)
      files[os.path.relpath(p, path)] = (st.st_size, st.st_mtime_ns)
  return files


def _bad_input_cases(root):
  """name -> (argv, model dir or None, strings the error line must name)."""
  bad_vocab = root / "bad.model"
  bad_vocab.write_bytes(b"\x00\xffnot a sentencepiece model\x13\x37" * 8)
  missing_gin = root / "missing.gin"
  no_data = root / "no_such_data_dir"
  args = lambda model_dir, *extra: train_run_args(root / model_dir)[2:] + list(extra)
  return {
      "missing_gin_file": ([f"--gin_file={missing_gin}", _model_dir_arg(root / "d_gin")],
                           "d_gin", [str(missing_gin)]),
      "unknown_binding": (args("d_binding", "--gin.NoSuchThing.x=1"), "d_binding",
                          ["NoSuchThing"]),
      "model_dir_missing": ([a for a in args("x") if not a.startswith("--gin.MODEL_DIR=")],
                            None, ["MODEL_DIR"]),
      "missing_data_dir": (args("d_data", "--gin.SFT.task='tldr_sft'",
                                f"--gin.SFT.data_dir='{no_data}'",
                                "--gin.TrainerConfig.progress=True"), "d_data", [str(no_data)]),
      "unreadable_vocabulary": (args("d_vocab", f"--gin.SFT.vocab_path='{bad_vocab}'"),
                                "d_vocab", [str(bad_vocab)]),
  }


@pytest.mark.parametrize("name", ["missing_gin_file", "unknown_binding", "model_dir_missing",
                                  "missing_data_dir", "unreadable_vocabulary"])
def test_bad_input_prints_one_line_error(tmp_path, monkeypatch, capsys, name):
  argv, model_dir, needles = _bad_input_cases(tmp_path)[name]
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  capsys.readouterr()
  code = run_main(train_bin.main, argv)
  out, err = capsys.readouterr()
  assert_one_line_error(code, out, err, needles)
  assert os.listdir(cwd) == []  # nothing written where it ran
  if model_dir:
    assert _checkpoint_steps(tmp_path / model_dir) == []


def test_resume_with_another_model_size_is_refused(train_run, tmp_path, capsys):
  model_dir = tmp_path / "run"
  shutil.copytree(train_run.model_dir, model_dir)
  before = _snapshot(model_dir)
  capsys.readouterr()
  code = run_main(train_bin.main, train_run_args(model_dir)[2:] + [
      "--gin.T5Config.d_model=64", f"--gin.TRAIN_STEPS={TRAIN_RUN_STEPS + 10}"])
  out, err = capsys.readouterr()
  assert_one_line_error(code, out, err, [str(model_dir / ckpt_lib.MODEL_JSON), "d_model=32",
                                         "d_model=64"])
  assert _snapshot(model_dir) == before


# ---- gin files ----------------------------------------------------------------
def _register_binaries():
  """Registers what the binaries' main() registers (idempotent)."""
  from realign_jax import decode as decode_bin
  from realign_jax import evaluate as evaluate_bin
  from realign_jax import train as train_bin
  from realign_jax import serve as serve_bin
  from realign_jax import synthetic_preferences
  from realign_jax.decoding import sampler
  gin_utils.register()
  for name, obj in (("train", train_bin.train), ("decode", decode_bin.decode),
                    ("serve", serve_bin.serve),
                    ("evaluate", evaluate_bin.evaluate),
                    ("build_preference_dir", synthetic_preferences.build_preference_dir),
                    ("SamplingConfig", sampler.SamplingConfig)):
    try:
      gin.get_configurable(name)
    except ValueError:
      gin.external_configurable(obj, name)


def _gin_files(subdir):
  out = []
  for root, _, names in os.walk(os.path.join(REPO_ROOT, subdir)):
    out += [os.path.relpath(os.path.join(root, n), REPO_ROOT) for n in names if n.endswith(".gin")]
  # NOTE: sweep files configure the sweep binary, not a run: tests/test_sweep.py checks them.
  return sorted(p for p in out if not p.startswith(os.path.join("configs", "sweeps") + os.sep))


def _required_macros(path) -> list:
  with open(path) as f:
    text = f.read()
  names = re.findall(r"^\s*(\w+)\s*=\s*%gin\.REQUIRED", text, re.M)
  for inc in re.findall(r"^\s*include\s+['\"]([^'\"]+)['\"]", text, re.M):
    names += _required_macros(os.path.join(REPO_ROOT, inc))
  return names


@pytest.fixture
def clean_gin():
  _register_binaries()
  yield
  gin.clear_config()


# The binaries other than train, by their configurable's name (the studies'
# are registered by `realign_jax.experiments.configurables`).
_BINARIES = ("decode", "serve", "evaluate", "build_preference_dir", "length_reward",
             "tldr_style", "frontier")


def _bindings(name):
  try:
    return gin.get_bindings(name)
  except ValueError:  # not registered (a study that does not exist)
    return {}


@pytest.mark.parametrize("path", _gin_files("configs"))
def test_every_run_config_parses_and_builds(path, clean_gin, tmp_path):
  required = _required_macros(os.path.join(REPO_ROOT, path))
  bindings = [f"{name} = '{tmp_path / name}'" for name in required]
  gin_utils.parse([path], bindings)
  binary = next((b for b in _BINARIES if _bindings(b)), "train")
  built = gin.get_bindings(binary)  # evaluates every @Configurable() it references
  assert built
  if binary == "train":
    assert built["model_dir"] == str(tmp_path / "MODEL_DIR")
    assert isinstance(built["train_steps"], int) and built["train_steps"] > 0
    algorithm = built["algorithm"]
    assert isinstance(algorithm, trainer_lib.Algorithm)
    abstract, axes = algorithm.abstract_init()
    assert count_params(abstract) > 0
    opt = train_bin._built_optimizer(built["optimizer"], algorithm, built["train_steps"])
    jax.eval_shape(opt.init, abstract)  # the optimizer fits the params
    assert isinstance(built["trainer_config"], trainer_lib.TrainerConfig)
  # Without its REQUIRED macros the file is refused, naming the first one.
  if required:
    with pytest.raises(UserError, match=required[0]):
      gin_utils.parse([path], bindings[1:])


@pytest.mark.parametrize("path", _gin_files(os.path.join("gin", "optimizers")))
def test_optimizer_fragments_bind(path, clean_gin, tmp_path):
  gin_utils.parse([SFT_GIN, path], [f"MODEL_DIR = '{tmp_path}'"])
  name = os.path.splitext(os.path.basename(path))[0]
  assert gin.get_bindings("make_optimizer")["name"] == name
  opt = gin.get_bindings("train")["optimizer"](total_steps=10)
  params = {"w": np.ones((3, 2), np.float32)}
  grads = {"w": np.full((3, 2), 0.5, np.float32)}
  state = opt.init(params)
  for _ in range(2):  # NOTE: a linear warmup gives lr 0 at step 0.
    updates, state = opt.update(grads, state, params)
  assert np.all(np.asarray(updates["w"]) < 0)


def _t5_param_count(c: T5Config) -> int:
  """T5.1.1: gated-GELU MLPs, RMSNorm scales, one relative bias per stack."""
  inner = c.num_heads * c.head_dim
  mlp = 3 * c.d_model * c.d_ff
  enc = c.num_encoder_layers * (4 * c.d_model * inner + mlp + 2 * c.d_model)
  dec = c.num_decoder_layers * (8 * c.d_model * inner + mlp + 3 * c.d_model)
  stacks = 2 * (c.d_model + c.relative_buckets * c.num_heads)  # final norms, relative biases
  emb = c.vocab_size * c.d_model * (1 if c.tie_embeddings else 2)
  return enc + dec + stacks + emb


def _decoder_param_count(c: DecoderConfig) -> int:
  """Llama: q/o of num_heads, k/v of num_kv_heads, SwiGLU MLP, two RMSNorms a layer."""
  attn = c.d_model * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
  layer = attn + 3 * c.d_model * c.d_ff + 2 * c.d_model
  emb = c.vocab_size * c.d_model * (1 if c.tie_embeddings else 2)
  return c.num_layers * layer + c.d_model + emb


# Published counts (HF t5-v1_1-* with the 32128-row untied embeddings; TinyLlama-1.1B).
PUBLISHED = {"t5_1_1_small": 76_961_152, "t5_1_1_base": 247_577_856,
             "t5_1_1_large": 783_150_080, "t5_1_1_xl": 2_849_757_184,
             "decoder_1b": 1_100_048_384}


@pytest.mark.parametrize("name", sizes.available())
def test_model_size_fragments_build_with_expected_param_counts(name, clean_gin):
  config = sizes.load(name)
  lm = LanguageModel(config)
  abstract, axes = lm.abstract_init()  # shapes only; nothing allocated
  n = count_params(abstract)
  formula = (_t5_param_count if isinstance(config, T5Config) else _decoder_param_count)(config)
  assert abs(n - formula) <= 0.01 * formula, (name, n, formula)
  if name in PUBLISHED:
    assert abs(n - PUBLISHED[name]) <= 0.01 * PUBLISHED[name], (name, n)
  assert jax.tree_util.tree_structure(abstract) == jax.tree_util.tree_structure(
      axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def test_published_counts_follow_from_the_architecture():
  # The formulas above reproduce the published numbers exactly.
  t5 = dict(vocab_size=32128, head_dim=64, tie_embeddings=False)
  assert _t5_param_count(T5Config(d_model=512, num_heads=6, d_ff=1024, num_encoder_layers=8,
                                  num_decoder_layers=8, **t5)) == PUBLISHED["t5_1_1_small"]
  assert _t5_param_count(T5Config(d_model=2048, num_heads=32, d_ff=5120, num_encoder_layers=24,
                                  num_decoder_layers=24, **t5)) == PUBLISHED["t5_1_1_xl"]
  assert _decoder_param_count(DecoderConfig(
      vocab_size=32000, d_model=2048, num_heads=32, num_kv_heads=4, head_dim=64, d_ff=5632,
      num_layers=22)) == PUBLISHED["decoder_1b"]


# ---- the tiny SFT run -------------------------------------------------------------
def _unigram_cross_entropy(task, *, input_length, target_length, num_eval, vocab_size):
  """Nats per validation target token (EOS included, as in the loss) under the add-one
  smoothed unigram distribution of the training targets: about what a model reaches that
  learned the token frequencies but uses neither the document nor the summary so far."""
  from realign_jax.data import pipeline
  lengths = dict(input_length=input_length, target_length=target_length)
  train = pipeline.encoded_split(task, "train", **lengths)["targets"]
  valid = pipeline.encoded_split(task, "validation", limit=num_eval, **lengths)["targets"]
  counts = np.bincount(train[train != 0], minlength=vocab_size).astype(np.float64) + 1.0
  counts[0] = 0.0  # padding is never a target
  probs = counts / counts.sum()
  return float(-np.mean(np.log(probs[valid[valid != 0]])))


def test_tiny_sft_beats_the_unigram_model_on_validation_loss(tiny_sft_dir):
  # NOTE: the suite's shared tiny SFT run (conftest.py: 32 input / 16 target tokens).
  # Measured: validation loss 5.71 on 256 examples, where the unigram model has 5.85.
  from realign_jax.training.sft import SFT
  lengths = dict(input_length=32, target_length=16)
  sft = SFT(model=LanguageModel(TINY_BUILTIN["t5"]), max_eval_examples=256, num_eval_samples=0,
            **lengths)
  metrics, _ = sft.evaluate(load_run_params(tiny_sft_dir), step=0)
  unigram = _unigram_cross_entropy("builtin_summarize", num_eval=256, vocab_size=2048, **lengths)
  # A model that learned only token frequencies ends at about `unigram`.
  assert metrics["loss"] <= unigram - SFT_BELOW_UNIGRAM, (metrics, unigram)
