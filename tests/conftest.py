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

  Trained once per test run: under pytest-xdist (session fixtures are per
  worker) the first worker to ask trains it into the run's shared temporary
  directory while holding a file lock; the others wait on the lock and reuse
  it. Treat it as read-only (start other runs from it; do not train in it).
  """
  import fcntl
  import shutil
  base = tmp_path_factory.getbasetemp()
  # NOTE: under xdist each worker's basetemp is <run>/popen-gwN; without xdist
  # the parent is shared by every pytest run of this user, so stay in basetemp.
  root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
  model_dir = root / "shared_tiny_sft"
  done = root / "shared_tiny_sft.done"
  with open(root / "shared_tiny_sft.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      if not done.exists():
        shutil.rmtree(model_dir, ignore_errors=True)  # a failed attempt's leftovers
        _train_tiny_sft(str(model_dir))
        done.write_text("ok\n")
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  return str(model_dir)
