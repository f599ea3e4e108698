"""Test setup: 8 simulated CPU devices, set before JAX is imported anywhere."""

import os

# NOTE: --xla_backend_optimization_level=0 skips LLVM's optimisation of the
# compiled CPU code. The suite's programs are tiny and mostly compiled once, so
# compilation dominates: measured on the 2-core CPU, tests/test_scan.py went
# from 61 to 35 CPU-seconds and tests/test_decoding.py from 166 to 112. The
# floating-point semantics are the same (no fast-math at any level). The
# benchmarks under benchmarks/ run at XLA's default level. Subprocesses of the
# tests inherit it through tests.helpers.subprocess_xla_flags.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import jax  # noqa: E402
import pytest  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def repo_root():
  return REPO_ROOT


def pytest_configure(config):
  del config
  assert len(jax.devices()) == 8, "tests expect 8 simulated CPU devices"


def run_temp_root(tmp_path_factory):
  """The temporary directory of this test run that every pytest-xdist worker shares.

  NOTE: under xdist each worker's basetemp is <run>/popen-gwN; without xdist
  the parent is shared by every pytest run of this user, so stay in basetemp.
  """
  base = tmp_path_factory.getbasetemp()
  return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


# ---- one compilation cache for the whole test run -----------------------------------
@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
  """JAX's persistent compilation cache in the run's shared directory, for this
  process and (through the environment) every subprocess of the run.

  NOTE: compiling dominates the suite: the same tiny programs (an SFT step, the
  sampler) are compiled again by each trainer.train call (fresh jitted
  closures), each test module, each pytest-xdist worker and each binary run
  in a subprocess. Measured on tests/test_run_robustness.py's in-process tests:
  87 CPU-s without the cache, 48 with it. Set before any test compiles
  (session scope, autouse); the settings are tests.helpers.compilation_cache_env.
  """
  from tests.helpers import compilation_cache_env
  directory = run_temp_root(tmp_path_factory) / "jax_cache"
  directory.mkdir(exist_ok=True)
  env = compilation_cache_env(directory)
  os.environ.update(env)  # NOTE: the binaries run by the tests inherit it
  jax.config.update("jax_compilation_cache_dir", env["JAX_COMPILATION_CACHE_DIR"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs",
                    float(env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
  jax.config.update("jax_compilation_cache_max_size",
                    int(env["JAX_COMPILATION_CACHE_MAX_SIZE"]))
  return str(directory)


def _once_per_run(tmp_path_factory, name: str, make) -> str:
  """`make(path)` run once per test run into <run>/name; returns the path.

  Under pytest-xdist (session fixtures are per worker) the first worker to ask
  makes it while holding a file lock; the others wait on the lock and reuse
  it. A `make` that raises leaves nothing marked done: the next one tries again.
  """
  import fcntl
  import shutil
  root = run_temp_root(tmp_path_factory)
  path, done = root / name, root / f"{name}.done"
  with open(root / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      if not done.exists():
        shutil.rmtree(path, ignore_errors=True)  # a failed attempt's leftovers
        make(path)
        done.write_text("ok\n")
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  return str(path)


# ---- a tiny SFT start shared by the tests that align from one ----------------------
# NOTE: the RL (PPO, PG) and DPO tests start from this run; its thresholds were
# measured against it (see those tests). Changing these settings means re-measuring.
TINY_SFT_STEPS = 100
TINY_SFT_LR = 3e-3


def _train_tiny_sft(model_dir: str) -> None:
  from realign_jax.checkpoints import run_dir
  from realign_jax.models.api import LanguageModel
  from realign_jax.parallel import partitioning
  from realign_jax.training import optim, trainer
  from realign_jax.training.sft import SFT
  from tests.helpers import TINY_BUILTIN
  cfg = TINY_BUILTIN["t5"]
  run_dir.write_model_json(model_dir, cfg)
  sft = SFT(model=LanguageModel(cfg), batch_size=16, input_length=32, target_length=16,
            num_eval_samples=0, max_eval_examples=16)
  trainer.train(
      algorithm=sft, model_dir=model_dir, train_steps=TINY_SFT_STEPS,
      optimizer=optim.make_optimizer(name="adamw", learning_rate=TINY_SFT_LR),
      mesh=partitioning.create_mesh(1, 1, devices=jax.devices()[:1]),
      rules=partitioning.logical_axis_rules(),
      config=trainer.TrainerConfig(checkpoint_every=1000, eval_every=0, log_every=1,
                                   progress=False, async_checkpoint=False))


@pytest.fixture(scope="session")
def tiny_sft_dir(tmp_path_factory):
  """A run directory of TINY_BUILTIN["t5"] trained by SFT on the built-in corpus.

  Trained once per test run (in process, see `_once_per_run`), in the run's
  shared temporary directory. Treat it as read-only (start other runs from it;
  do not train in it).
  """
  return _once_per_run(tmp_path_factory, "shared_tiny_sft", lambda p: _train_tiny_sft(str(p)))


# ---- the train binary's uninterrupted run, shared ---------------------------------------
class TrainRun:
  """A finished run of the train binary: its directory and what it printed."""

  def __init__(self, model_dir: str):
    self.model_dir = model_dir
    with open(f"{model_dir}.out") as f:
      self.stdout = f.read()
    with open(f"{model_dir}.err") as f:
      self.stderr = f.read()


def _run_train_binary(model_dir) -> None:
  from tests.helpers import (REPO_ROOT, TRAIN_RUN_DEVICES, BinaryRun, binary_env,
                             train_run_args)
  run = BinaryRun(train_run_args(model_dir), env=binary_env(TRAIN_RUN_DEVICES), cwd=REPO_ROOT,
                  log_prefix=str(model_dir)).wait(timeout=600)
  if run.returncode != 0:
    raise RuntimeError(f"the shared train binary run failed:\n{run.describe()}")


@pytest.fixture(scope="session")
def train_run(tmp_path_factory):
  """The train binary's uninterrupted run of tests.helpers.train_run_args (a TrainRun).

  Run once per test run (see `_once_per_run`): the SIGKILL test of
  tests/test_train_binary.py and the two-process SIGTERM test of
  tests/test_multihost.py compare their resumed runs with it. Read-only.
  """
  return TrainRun(_once_per_run(tmp_path_factory, "shared_train_run", _run_train_binary))
