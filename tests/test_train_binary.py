"""The training binary end to end (`python -m realign_jax.train` subprocesses) and
every gin file (parsed in-process).

These are the slow tests. To keep them short on a 2-core machine, the
subprocesses share one persistent JAX compilation cache, and the runs that do
not depend on each other (the tiny SFT run, the uninterrupted reference run and
the bad-input runs) start together when the module's first subprocess test
needs them; the ones off the critical path run at a lower CPU priority while
the SIGKILL/SIGTERM chain and the in-process gin tests run in the foreground.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import gin
import jax
import numpy as np
import pytest

from realign_jax import gin_utils
from realign_jax import train as train_bin
from realign_jax.checkpoints import manager as ckpt_lib
from realign_jax.errors import UserError
from realign_jax.models import sizes
from realign_jax.models.api import LanguageModel, count_params
from realign_jax.models.config import DecoderConfig, T5Config
from realign_jax.training import trainer as trainer_lib
from tests.helpers import (BinaryRun, compilation_cache_env, load_run_params,
                           subprocess_xla_flags)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFT_GIN = os.path.join(REPO_ROOT, "configs", "sft", "builtin_tiny.gin")

# The tiny SFT run: the config's defaults, fewer steps. Measured: validation loss 8.18 at
# step 0, 5.61 at step 60, where the unigram model of the targets has 5.85.
SFT_STEPS = 60
# How far below the unigram model's cross-entropy the run must end (nats per token).
SFT_BELOW_UNIGRAM = 0.1
# A fast run for the interruption tests (checkpoints every 5 of 30 steps).
FAST_STEPS = 30
FAST = [f"--gin_file={SFT_GIN}", "--gin.T5Config.d_model=32", "--gin.SFT.batch_size=8",
        "--gin.SFT.input_length=32", "--gin.SFT.target_length=8",
        "--gin.TrainerConfig.checkpoint_every=5", "--gin.TrainerConfig.eval_every=0",
        "--gin.TrainerConfig.log_every=1", "--gin.TrainerConfig.progress=False",
        f"--gin.TRAIN_STEPS={FAST_STEPS}"]


def _model_dir_arg(path) -> str:
  return f"--gin.MODEL_DIR='{path}'"


# ---- subprocess plumbing ------------------------------------------------------
def _Run(args, *, env, cwd, log_prefix, nice=False) -> BinaryRun:
  """One `python -m realign_jax.train` subprocess; output goes to files."""
  return BinaryRun(["-m", "realign_jax.train", *args], env=env, cwd=cwd, log_prefix=log_prefix,
                   nice=nice)


class _Launcher:
  """Starts subprocesses with a shared environment; kills leftovers at teardown."""

  def __init__(self, root):
    self.root = root
    self.cache = root / "jax_cache"
    self._runs = []
    self._n = 0

  def env(self, devices: int = 1, optimize: bool = False) -> dict:
    env = dict(os.environ)
    # NOTE: no TF_CPP_MIN_LOG_LEVEL: the binaries must be quiet on their own.
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    env.update(JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="",
               **compilation_cache_env(self.cache),
               PYTHONPATH=os.pathsep.join(
                   p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p))
    env["XLA_FLAGS"] = subprocess_xla_flags(devices, optimize)
    return env

  def start(self, args, *, devices: int = 1, cwd=None, background=False,
            optimize=False) -> BinaryRun:
    """Starts a run; `background` ones get a lower CPU priority (`optimize`: see
    tests.helpers.subprocess_xla_flags)."""
    self._n += 1
    run = _Run(args, env=self.env(devices, optimize), cwd=str(cwd or REPO_ROOT),
               log_prefix=str(self.root / f"run{self._n}"), nice=background)
    self._runs.append(run)
    return run

  def close(self):
    for run in self._runs:
      if run.running():
        run.proc.kill()  # only processes this launcher started
        run.proc.wait()


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


# ---- background runs ----------------------------------------------------------
def _bad_input_cases(root):
  """name -> (extra args, model dir or None, strings the error line must name)."""
  bad_vocab = root / "bad.model"
  bad_vocab.write_bytes(b"\x00\xffnot a sentencepiece model\x13\x37" * 8)
  missing_gin = root / "missing.gin"
  no_data = root / "no_such_data_dir"
  cases = {
      "missing_gin_file": ([f"--gin_file={missing_gin}"], "d_gin", [str(missing_gin)]),
      "unknown_binding": (FAST + ["--gin.NoSuchThing.x=1"], "d_binding", ["NoSuchThing"]),
      "model_dir_missing": (FAST, None, ["MODEL_DIR"]),
      "missing_data_dir": (FAST + ["--gin.SFT.task='tldr_sft'", f"--gin.SFT.data_dir='{no_data}'",
                                   "--gin.TrainerConfig.progress=True"],
                           "d_data", [str(no_data)]),
      "unreadable_vocabulary": (FAST + [f"--gin.SFT.vocab_path='{bad_vocab}'"], "d_vocab",
                                [str(bad_vocab)]),
  }
  return cases


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
  """Starts the independent runs at once; yields (launcher, dict of runs, root)."""
  root = tmp_path_factory.mktemp("train_binary")
  launcher = _Launcher(root)
  runs = {}
  runs["sft"] = launcher.start(
      [f"--gin_file={SFT_GIN}", _model_dir_arg(root / "sft"), f"--gin.TRAIN_STEPS={SFT_STEPS}",
       "--gin.TrainerConfig.progress=False"], background=True, optimize=True)
  runs["reference"] = launcher.start(FAST + [_model_dir_arg(root / "reference")])
  cases = _bad_input_cases(root)
  for name, (args, model_dir, _) in cases.items():
    cwd = root / f"cwd_{name}"
    cwd.mkdir()
    extra = [_model_dir_arg(root / model_dir)] if model_dir else []
    runs[name] = launcher.start(args + extra, cwd=cwd, background=True)
  runs["cases"] = cases
  yield launcher, runs, root
  launcher.close()


# ---- interruption ---------------------------------------------------------------
@pytest.fixture(scope="module")
def interrupted(launched):
  """SIGKILL after a checkpoint, resume and SIGTERM it, resume to the end."""
  launcher, runs, root = launched
  model_dir = root / "interrupted"
  args = FAST + [_model_dir_arg(model_dir)]
  obs = {}

  # NOTE: start once the reference run has compiled (it has a checkpoint), so
  # this one finds its programs in the shared compilation cache.
  ref_dir = root / "reference"
  _wait_for(lambda: _checkpoint_steps(ref_dir), runs["reference"], "a reference checkpoint")

  # 1. SIGKILL once a checkpoint of step >= 5 is complete.
  run = launcher.start(args)
  _wait_for(lambda: any(s >= 5 for s in _checkpoint_steps(model_dir)), run,
            "a checkpoint of step >= 5")
  os.kill(run.proc.pid, signal.SIGKILL)
  obs["kill"] = run.wait()
  obs["killed_ckpt"] = max(_checkpoint_steps(model_dir))
  obs["killed_rows"] = _metrics(model_dir)

  # 2. Resume; SIGTERM once it has gone past where the killed run got to.
  killed_max = max(_train_steps(obs["killed_rows"]))
  run = launcher.start(args)
  _wait_for(lambda: max(_train_steps(_metrics(model_dir)), default=0) >= killed_max + 2, run,
            f"step {killed_max + 2} of the resumed run")
  os.kill(run.proc.pid, signal.SIGTERM)
  obs["term"] = run.wait()
  obs["term_ckpts"] = _checkpoint_steps(model_dir)
  obs["term_rows"] = _metrics(model_dir)

  # 3. Resume to the end.
  obs["final"] = launcher.start(args).wait()
  obs["final_rows"] = _metrics(model_dir)
  obs["dir"] = model_dir
  return obs


def _rows_up_to(rows, step):
  return [r for r in rows if r["step"] <= step]


def test_sigkill_then_resume_equals_uninterrupted_run(launched, interrupted):
  _, runs, root = launched
  kill = interrupted["kill"]
  assert kill.returncode == -signal.SIGKILL, kill.describe()
  killed_ckpt = interrupted["killed_ckpt"]
  assert 5 <= killed_ckpt < FAST_STEPS
  final = interrupted["final"]
  assert final.returncode == 0, final.describe()
  reference = runs["reference"].wait()
  assert reference.returncode == 0, reference.describe()

  # Each step logged exactly once, and the rows up to the checkpoint the
  # resumed run started from are the killed run's own (it did not restart).
  rows = interrupted["final_rows"]
  assert _train_steps(rows) == list(range(1, FAST_STEPS + 1))
  assert _rows_up_to(rows, killed_ckpt) == _rows_up_to(interrupted["killed_rows"], killed_ckpt)

  diff = _max_abs_diff(load_run_params(interrupted["dir"]), load_run_params(root / "reference"))
  assert diff <= 1e-6, diff
  ref_losses = [r["loss"] for r in _metrics(root / "reference")]
  np.testing.assert_allclose([r["loss"] for r in rows], ref_losses, rtol=0, atol=1e-6)


def test_sigterm_saves_current_step_exits_143_and_resumes(interrupted):
  term = interrupted["term"]
  assert term.returncode == trainer_lib.PREEMPTED_EXIT_CODE == 143, term.describe()
  # The checkpoint is of the step the run had reached (its last logged step).
  saved = max(interrupted["term_ckpts"])
  assert saved == max(_train_steps(interrupted["term_rows"]))
  assert interrupted["killed_ckpt"] < saved < FAST_STEPS
  assert f"saved checkpoint at step {saved}" in term.stderr
  assert "Traceback" not in term.stderr
  # The rerun kept that run's rows up to `saved`, i.e. it resumed from there.
  final_rows = interrupted["final_rows"]
  assert _rows_up_to(final_rows, saved) == _rows_up_to(interrupted["term_rows"], saved)
  assert _train_steps(final_rows) == list(range(1, FAST_STEPS + 1))
  assert max(_checkpoint_steps(interrupted["dir"])) == FAST_STEPS


# ---- bad input ------------------------------------------------------------------
def _snapshot(path):
  files = {}
  for root, _, names in os.walk(path):
    for name in names:
      p = os.path.join(root, name)
      st = os.stat(p)
      files[os.path.relpath(p, path)] = (st.st_size, st.st_mtime_ns)
  return files


def _check_one_line_error(run: BinaryRun, needles):
  assert run.returncode == 2, run.describe()
  assert "Traceback" not in run.stderr, run.describe()
  errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, run.describe()
  assert run.stderr.strip().splitlines() == errors, run.describe()  # nothing else
  for needle in needles:
    assert needle in errors[0], (needle, errors[0])
  assert "error" not in run.stdout.lower(), run.describe()


@pytest.mark.parametrize("name", ["missing_gin_file", "unknown_binding", "model_dir_missing",
                                  "missing_data_dir", "unreadable_vocabulary"])
def test_bad_input_prints_one_line_error(launched, name):
  _, runs, root = launched
  _, model_dir, needles = runs["cases"][name]
  run = runs[name].wait()
  _check_one_line_error(run, needles)
  assert os.listdir(root / f"cwd_{name}") == []  # nothing written where it ran
  if model_dir:
    assert _checkpoint_steps(root / model_dir) == []


def test_resume_with_another_model_size_is_refused(launched, tmp_path):
  launcher, runs, root = launched
  reference = runs["reference"].wait()
  assert reference.returncode == 0, reference.describe()
  model_dir = tmp_path / "run"
  shutil.copytree(root / "reference", model_dir)
  before = _snapshot(model_dir)
  run = launcher.start(FAST + [_model_dir_arg(model_dir), "--gin.T5Config.d_model=64",
                               f"--gin.TRAIN_STEPS={FAST_STEPS + 10}"]).wait()
  _check_one_line_error(run, [str(model_dir / ckpt_lib.MODEL_JSON), "d_model=32", "d_model=64"])
  assert _snapshot(model_dir) == before


# ---- gin files ----------------------------------------------------------------
def _register_binaries():
  """Registers what the binaries' main() registers (idempotent)."""
  from realign_jax import decode as decode_bin
  from realign_jax import evaluate as evaluate_bin
  from realign_jax import train as train_bin
  from realign_jax import synthetic_preferences
  from realign_jax.decoding import sampler
  gin_utils.register()
  for name, obj in (("train", train_bin.train), ("decode", decode_bin.decode),
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
_BINARIES = ("decode", "evaluate", "build_preference_dir", "length_reward", "tldr_style",
             "frontier")


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


def test_tiny_sft_beats_the_unigram_model_on_validation_loss(launched):
  _, runs, root = launched
  # NOTE: the settings of configs/sft/builtin_tiny.gin (checked in config.gin below).
  unigram = _unigram_cross_entropy("builtin_summarize", input_length=96, target_length=24,
                                   num_eval=256, vocab_size=2048)
  run = runs["sft"].wait()
  assert run.returncode == 0, run.describe()
  model_dir = root / "sft"
  evals = {r["step"]: r["loss"] for r in _metrics(model_dir) if r["split"] == "eval"}
  assert 0 in evals and SFT_STEPS in evals, evals
  # A model that learned only token frequencies ends at about `unigram`.
  assert evals[SFT_STEPS] <= unigram - SFT_BELOW_UNIGRAM, (evals, unigram)

  with open(model_dir / "samples.jsonl") as f:
    samples = [json.loads(line) for line in f]
  assert samples and all(s["sample"].strip() and s["prompt"] for s in samples)
  config, _ = ckpt_lib.read_model_json(str(model_dir))
  assert config.d_model == 128 and config.vocab_size == 2048  # gin/models/t5_tiny.gin
  with open(model_dir / "config.gin") as f:
    operative = f.read()
  assert "SFT.batch_size = 32" in operative and f"TRAIN_STEPS = {SFT_STEPS}" in operative
  for line in ("SFT.input_length = 96", "SFT.target_length = 24", "SFT.max_eval_examples = 256",
               "SFT.task = 'builtin_summarize'", "SFT.eval_split = 'validation'",
               "SFT.vocab_path = None"):
    assert line in operative, line
  assert any(n.startswith("events.out.tfevents") for n in os.listdir(model_dir / "tb"))
  assert _checkpoint_steps(model_dir) == [SFT_STEPS]
  assert f"done: step {SFT_STEPS}" in run.stdout
  # stderr holds the progress bar and nothing else (no native start-up logging)
  noise = [seg for seg in re.split(r"[\r\n]+", run.stderr)
           if seg.strip() and not seg.startswith("sft:")]
  assert noise == [], run.describe()
