"""Small shared factories for tests: the tiny models, random batches, and the binaries
run in a subprocess (`BinaryRun`, `binary_env`) or in this process (`run_main`).

The two-process scenarios have their own harness, tests/multiprocess.py.
"""

import os
import shutil
import subprocess
import sys

import numpy as np

from realign_jax.models.config import DecoderConfig, T5Config, replace

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Tiny models over a 64-piece vocabulary, for model-level tests on random token ids.
TINY = {
    "t5": T5Config(vocab_size=64, d_model=32, num_heads=4, head_dim=8, d_ff=64,
                   num_encoder_layers=2, num_decoder_layers=2),
    "decoder": DecoderConfig(vocab_size=64, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
                             d_ff=64, num_layers=2),
}


# TINY with one layer per stack, for the tests of the decoding methods' caches
# (test_controlled, test_transfer_q): a second layer only adds compile time there.
TINY_SHALLOW = {"t5": replace(TINY["t5"], num_encoder_layers=1, num_decoder_layers=1),
                "decoder": replace(TINY["decoder"], num_layers=1)}


def random_batch(rng: np.random.Generator, batch: int, li: int, lt: int, vocab: int,
                 min_len: int = 1):
  """Right-padded prompts ending in EOS (1) and right-padded targets ending in EOS."""
  inputs = np.zeros((batch, li), np.int32)
  targets = np.zeros((batch, lt), np.int32)
  for i in range(batch):
    n = int(rng.integers(min_len, li + 1))
    inputs[i, :n] = rng.integers(2, vocab, n)
    inputs[i, n - 1] = 1
    m = int(rng.integers(1, lt + 1))
    targets[i, :m] = rng.integers(2, vocab, m)
    targets[i, m - 1] = 1
  return inputs, targets


# THE tiny models of the suite: over the built-in 2048-piece vocabulary, for
# every test on the built-in corpus (the shared tiny SFT run of conftest.py is
# TINY_BUILTIN["t5"]). Head counts divide the test mesh's model axis (2). The
# decoder has dropout, so resume and sharding tests cover the per-step dropout
# RNG; the T5 one has none (T5's dropout more than doubles its step's compile time).
# NOTE: tests that use one of these shapes compile the same programs, which the
# run's one compilation cache (conftest.py) then holds once for all of them.
TINY_BUILTIN = {
    "t5": T5Config(vocab_size=2048, d_model=32, num_heads=2, head_dim=16, d_ff=64,
                   num_encoder_layers=1, num_decoder_layers=1),
    "decoder": DecoderConfig(vocab_size=2048, d_model=32, num_heads=4, num_kv_heads=2,
                             head_dim=8, d_ff=64, num_layers=1, dropout_rate=0.1),
}

# The overrides that make the shipped tiny configs' model (gin/models/t5_tiny.gin)
# TINY_BUILTIN["t5"], for binaries run by the tests (a run that starts from the
# shared tiny SFT run needs its architecture).
TINY_T5_GIN = ["--gin.T5Config.d_model=32", "--gin.T5Config.num_heads=2",
               "--gin.T5Config.head_dim=16", "--gin.T5Config.d_ff=64",
               "--gin.T5Config.num_encoder_layers=1", "--gin.T5Config.num_decoder_layers=1",
               "--gin.T5Config.dropout_rate=0.0"]


# ---- the train binary's uninterrupted run (conftest.train_run) ------------------------
# The tiny SFT config on TINY_BUILTIN["t5"] for 12 steps on 1 process x 4 devices:
# the interruption tests (a SIGKILL in tests/test_train_binary.py, a SIGTERM to one of
# two processes in tests/test_multihost.py) must end equal to it, and the binary's
# end-to-end checks read its files and output. Evaluated at steps 0 and 12.
TRAIN_RUN_STEPS = 12
TRAIN_RUN_DEVICES = 4


def train_run_args(model_dir) -> list:
  """The arguments (`python ARGS...`) of the train binary's run into `model_dir`."""
  return ["-m", "realign_jax.train", "--gin_file=configs/sft/builtin_tiny.gin",
          f"--gin.MODEL_DIR='{model_dir}'", f"--gin.TRAIN_STEPS={TRAIN_RUN_STEPS}",
          *TINY_T5_GIN, "--gin.SFT.batch_size=8", "--gin.SFT.input_length=32",
          "--gin.SFT.target_length=8", "--gin.SFT.max_eval_examples=16",
          "--gin.TrainerConfig.log_every=1", "--gin.TrainerConfig.checkpoint_every=3",
          f"--gin.TrainerConfig.eval_every={TRAIN_RUN_STEPS}"]


class BinaryRun:
  """One `python ARGS...` subprocess (a binary's `-m module ...` or a script); output to files.

  `nice`: started at a lower CPU priority (a `nice` command prefix, not os.nice
  in a preexec_fn: forking a multithreaded JAX process and running Python in
  the child can deadlock).
  """

  def __init__(self, python_args, *, env, cwd, log_prefix, nice=False):
    self.args = list(python_args)
    self._out = open(f"{log_prefix}.out", "w+")
    self._err = open(f"{log_prefix}.err", "w+")
    prefix = ["nice", "-n", "10"] if nice and shutil.which("nice") else []
    self.proc = subprocess.Popen(prefix + [sys.executable, *self.args], cwd=cwd, env=env,
                                 stdout=self._out, stderr=self._err)
    self.stdout = self.stderr = None

  def running(self) -> bool:
    return self.proc.poll() is None

  def wait(self, timeout: float = 600) -> "BinaryRun":
    if self.stdout is None:
      self.proc.wait(timeout=timeout)
      for f in (self._out, self._err):
        f.seek(0)
      self.stdout, self.stderr = self._out.read(), self._err.read()
      self._out.close()
      self._err.close()
    return self

  @property
  def returncode(self):
    return self.proc.returncode

  def describe(self) -> str:
    return f"rc={self.returncode} args={self.args}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"


def load_run_params(model_dir):
  """A run directory's latest params (with its output head) as numpy arrays, on one device."""
  import jax  # pylint: disable=g-import-not-at-top
  from realign_jax.checkpoints import manager as ckpt_lib  # pylint: disable=g-import-not-at-top
  from realign_jax.models.api import LanguageModel  # pylint: disable=g-import-not-at-top
  config, head = ckpt_lib.read_model_json(str(model_dir))
  abstract, _ = LanguageModel(config, head).abstract_init()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree_util.tree_map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), abstract)
  return ckpt_lib.as_numpy(ckpt_lib.load_params(str(model_dir), abstract))


# A size bound large enough never to evict anything the suite compiles.
_CACHE_MAX_BYTES = 1 << 36
# Programs that compile faster than this are not cached (see compilation_cache_env).
_CACHE_MIN_COMPILE_S = 0.1


def compilation_cache_env(directory) -> dict:
  """The settings of the test run's one persistent compilation cache, as environment
  variables (conftest.py exports them, so every subprocess shares the cache).

  NOTE: JAX writes a cache entry in place, without a lock, unless the cache
  has a size bound; then reads and writes go through a file lock. Processes
  started together compile the same programs, and without the lock one of
  them can read another's half-written entry (a warning on stderr, where the
  binaries must print nothing but their own lines). With the bound, each
  write lists the whole directory (JAX's LRU eviction): measured at 1,000 to
  2,000 entries, 0.1 to 0.16 s a write on the loaded 2-core machine. So
  programs that compile in under _CACHE_MIN_COMPILE_S stay out: the eager ops,
  which are most entries at 0 s (344 files against 106 at 0.1 s for
  tests/test_run_robustness.py) and save little (a binary's run from a warm
  cache: 10.8 CPU-s with them, 11.8 without).
  """
  return {"JAX_COMPILATION_CACHE_DIR": str(directory),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": str(_CACHE_MIN_COMPILE_S),
          "JAX_COMPILATION_CACHE_MAX_SIZE": str(_CACHE_MAX_BYTES)}


# Multi-host settings of an outer job that a binary run by the tests must not see.
_HOST_VARIABLES = ("SLURM_", "JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "TPU_",
                   "MEGASCALE_")


def binary_env(devices: int = 1, optimize: bool = False, extra: dict = None) -> dict:
  """The environment of a binary run in a subprocess: a user's (no test-only logging
  settings: the binaries must be quiet on their own), on the CPU with `devices`
  simulated devices (see subprocess_xla_flags), this checkout importable, the test
  run's compilation cache (exported by conftest.py) and `extra` on top.
  """
  env = {k: v for k, v in os.environ.items() if not k.startswith(_HOST_VARIABLES)}
  env.pop("TF_CPP_MIN_LOG_LEVEL", None)
  env.update(JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="",
             XLA_FLAGS=subprocess_xla_flags(devices, optimize),
             PYTHONPATH=os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH"))
                                        if p))
  env.update(extra or {})
  return env


def run_main(main, argv) -> int:
  """A binary's `main(argv)` in this process, as `python -m` runs it: through
  `gin_utils.run_main` (a UserError is one `error:` line on stderr and exit 2);
  returns the exit code. Gin's bindings are cleared before and after.

  NOTE: the binaries' error paths run here (no subprocess: about 6 CPU-s of
  imports each); tests/test_startup.py runs every binary as a subprocess.
  """
  import gin  # pylint: disable=g-import-not-at-top
  from realign_jax.plumbing import gin_utils  # pylint: disable=g-import-not-at-top
  saved = sys.argv
  sys.argv = ["binary"] + [str(a) for a in argv]
  gin.clear_config()
  try:
    gin_utils.run_main(main)
  except SystemExit as e:
    return e.code
  finally:
    sys.argv = saved
    gin.clear_config()
  raise AssertionError("gin_utils.run_main returned without exiting")


def assert_one_line_error(returncode, stdout: str, stderr: str, needles=()) -> str:
  """Exit 2, stderr exactly one `error: ...` line naming every needle, no error on stdout."""
  where = f"rc={returncode}\nstdout:\n{stdout}\nstderr:\n{stderr}"
  assert returncode == 2, where
  assert "Traceback" not in stderr, where
  lines = stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), where
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])
  assert "error" not in stdout.lower(), where
  return lines[0]


def subprocess_xla_flags(devices: int = 1, optimize: bool = False) -> str:
  """XLA_FLAGS for a subprocess of the tests: this process's flags (see
  conftest.py) with `devices` simulated CPU devices instead of its 8.

  `optimize`: XLA's default optimisation level instead of the suite's 0, for
  a run whose steps cost more than its compiles (measured: the tiny SFT
  config's 60 steps take 40 CPU-s at the default level, 58 at level 0).
  """
  drop = ("--xla_force_host_platform_device_count",) + (
      ("--xla_backend_optimization_level",) if optimize else ())
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(drop)]
  if devices > 1:
    flags.append(f"--xla_force_host_platform_device_count={devices}")
  return " ".join(flags)
