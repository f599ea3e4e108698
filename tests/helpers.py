"""Small shared factories for tests (tiny models, random batches, binary subprocesses)."""

import os
import shutil
import subprocess
import sys

import numpy as np

from realign_jax.models.config import DecoderConfig, T5Config

TINY = {
    "t5": T5Config(vocab_size=64, d_model=32, num_heads=4, head_dim=8, d_ff=64,
                   num_encoder_layers=2, num_decoder_layers=2),
    "decoder": DecoderConfig(vocab_size=64, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
                             d_ff=64, num_layers=2),
}


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


# Tiny models over the built-in 2048-piece vocabulary, for trainer tests on the
# built-in corpus. Head counts divide the test mesh's model axis (2). The
# decoder has dropout, so resume and sharding tests cover the per-step dropout
# RNG; the T5 one has none (T5's dropout more than doubles its step's compile time).
TINY_BUILTIN = {
    "t5": T5Config(vocab_size=2048, d_model=32, num_heads=2, head_dim=16, d_ff=64,
                   num_encoder_layers=1, num_decoder_layers=1),
    "decoder": DecoderConfig(vocab_size=2048, d_model=32, num_heads=4, num_kv_heads=2,
                             head_dim=8, d_ff=64, num_layers=1, dropout_rate=0.1),
}


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


def compilation_cache_env(directory) -> dict:
  """Environment for subprocesses that share one persistent compilation cache.

  NOTE: JAX writes a cache entry in place, without a lock, unless the cache
  has a size bound; then reads and writes go through a file lock. Processes
  started together compile the same programs, and without the lock one of
  them can read another's half-written entry (a warning on stderr, where the
  binaries must print nothing but their own lines).
  """
  return {"JAX_COMPILATION_CACHE_DIR": str(directory),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_COMPILATION_CACHE_MAX_SIZE": str(_CACHE_MAX_BYTES)}


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
