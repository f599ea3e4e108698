"""Multi-host runs on localhost: 2 processes x 2 simulated CPU devices, started as SLURM starts them.

The coordinator listens on 127.0.0.1 only, on a port that the test makes free
(SLURM's port is derived from SLURM_JOB_ID, so the test picks the job id). One
run of the tiny SFT config is stopped by a SIGTERM sent to process 1 alone,
then resumed; its final parameters must match a 1-process run over 4 devices
with the same global batch and seed, and every file of the run must have been
written once (no duplicated metrics record).
"""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from realign_jax.errors import UserError
from realign_jax.parallel import multihost
from tests.helpers import (BinaryRun, compilation_cache_env, load_run_params,
                           subprocess_xla_flags)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFT_GIN = "configs/sft/builtin_tiny.gin"
STEPS = 12
TIMEOUT_S = 240


def _slurm_job_ids(n: int) -> list:
  """n SLURM_JOB_IDs whose coordinator ports (61440 + id % 4096) differ and are free.

  NOTE: all n are drawn in one call: a port is free until its coordinator
  listens, so two separate calls made before then could return the same one.
  """
  rng = random.Random(os.getpid() * 7919 + 1)
  ports = []
  for _ in range(400):
    port = multihost.SLURM_PORT_BASE + rng.randrange(multihost.SLURM_PORT_RANGE)
    with socket.socket() as s:
      try:
        s.bind(("127.0.0.1", port))
      except OSError:
        continue
    if port not in ports:
      ports.append(port)
    if len(ports) == n:
      return [str(p - multihost.SLURM_PORT_BASE + 4096 * rng.randrange(1, 100)) for p in ports]
  raise RuntimeError("no free ports in SLURM's coordinator range")


def _free_slurm_job_id() -> str:
  """A SLURM_JOB_ID whose coordinator port (61440 + id % 4096) is free on 127.0.0.1."""
  return _slurm_job_ids(1)[0]


def _env(devices: int, cache, slurm: dict = None) -> dict:
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("SLURM_", "JAX_COORDINATOR", "JAX_NUM_PROCESSES",
                              "JAX_PROCESS_ID", "TPU_", "MEGASCALE_"))}
  env.update(JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="",
             XLA_FLAGS=subprocess_xla_flags(devices),
             **compilation_cache_env(cache),
             PYTHONPATH=os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH"))
                                        if p))
  env.update(slurm or {})
  return env


def _slurm(job_id: str, rank: int) -> dict:
  return {"SLURM_JOB_ID": job_id, "SLURM_STEP_NODELIST": "127.0.0.1", "SLURM_NTASKS": "2",
          "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)}


def _train_args(model_dir) -> list:
  return ["-m", "realign_jax.train", f"--gin_file={SFT_GIN}",
          f"--gin.MODEL_DIR='{model_dir}'", f"--gin.TRAIN_STEPS={STEPS}",
          "--gin.TrainerConfig.log_every=1", "--gin.TrainerConfig.eval_every=0",
          "--gin.TrainerConfig.checkpoint_every=1000", "--gin.TrainerConfig.async_checkpoint=False",
          # NOTE: a smaller model than the config's (the compiles and steps of 5 processes
          # on 2 cores); the global batch still splits into 2 processes x 2 devices.
          "--gin.T5Config.d_model=32", "--gin.T5Config.num_heads=2", "--gin.T5Config.head_dim=16",
          "--gin.T5Config.d_ff=64", "--gin.SFT.batch_size=8", "--gin.SFT.input_length=32",
          "--gin.SFT.target_length=8"]


def _start_two(tmp, name, model_dir, cache) -> list:
  job = _free_slurm_job_id()
  return [BinaryRun(_train_args(model_dir), env=_env(2, cache, _slurm(job, rank)),
                    cwd=REPO_ROOT, log_prefix=str(tmp / f"{name}.p{rank}"))
          for rank in (0, 1)]


def _wait_all(runs, timeout=TIMEOUT_S):
  deadline = time.monotonic() + timeout
  try:
    for r in runs:
      r.wait(timeout=max(1.0, deadline - time.monotonic()))
  except subprocess.TimeoutExpired:
    for r in runs:
      if r.running():
        r.proc.kill()  # only the processes this test started
        r.proc.wait()
    pytest.fail("a multi-host run did not finish in time:\n" +
                "\n".join(r.wait().describe() for r in runs))
  return runs


def _records(model_dir) -> list:
  with open(os.path.join(model_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """(1-process run dir, 2-process run dir, the SIGTERM'd processes, the resumed processes)."""
  tmp = tmp_path_factory.mktemp("multihost")
  cache = tmp / "jax_cache"
  one, two = tmp / "one", tmp / "two"
  # NOTE: the reference runs at a lower priority alongside the 2-process run.
  ref = BinaryRun(_train_args(one), env=_env(4, cache), cwd=REPO_ROOT,
                  log_prefix=str(tmp / "one"), nice=True)
  first = _start_two(tmp, "first", two, cache)
  metrics = two / "metrics.jsonl"
  deadline = time.monotonic() + TIMEOUT_S
  while time.monotonic() < deadline and all(r.running() for r in first):
    if metrics.exists() and metrics.read_text().count("\n") >= 1:
      first[1].proc.send_signal(signal.SIGTERM)  # one host only
      break
    time.sleep(0.05)
  _wait_all(first)
  resumed = _wait_all(_start_two(tmp, "resumed", two, cache))
  _wait_all([ref])
  assert ref.returncode == 0, ref.describe()
  return one, two, first, resumed


def test_sigterm_on_one_host_saves_the_same_step_on_every_host(runs):
  _, two, first, _ = runs
  codes = [r.returncode for r in first]
  assert codes == [143, 143], "\n".join(r.describe() for r in first)
  saved = {r.stderr.strip().splitlines()[-1] for r in first}
  assert len(saved) == 1 and "SIGTERM: saved checkpoint at step" in saved.pop()
  # NOTE: written when training started: the preempted run never reached its end.
  assert (two / "config.gin").read_text().strip()


def test_resumed_two_process_run_matches_one_process(runs):
  one, two, _, resumed = runs
  assert [r.returncode for r in resumed] == [0, 0], "\n".join(r.describe() for r in resumed)
  a, b = load_run_params(one), load_run_params(two)
  diffs = jax.tree_util.tree_map(lambda x, y: float(np.max(np.abs(x - y))), a, b)
  worst = max(jax.tree_util.tree_leaves(diffs))
  assert worst < 1e-5, diffs


def test_every_record_written_once_by_process_zero(runs):
  one, two, first, resumed = runs
  rows = _records(two)
  steps = [r["step"] for r in rows if r["split"] == "train"]
  assert steps == list(range(1, STEPS + 1))
  ref_loss = {r["step"]: r["loss"] for r in _records(one) if r["split"] == "train"}
  for r in rows:
    assert r["loss"] == pytest.approx(ref_loss[r["step"]], rel=1e-4, abs=1e-5)
  # NOTE: only process 0 draws the progress bar.
  for pair in (first, resumed):
    assert "step/s" in pair[0].stderr or "s/step" in pair[0].stderr, pair[0].describe()
    assert "step/s" not in pair[1].stderr and "s/step" not in pair[1].stderr, pair[1].describe()


def test_slurm_layout_and_bad_input(monkeypatch):
  env = {"SLURM_JOB_ID": "4101", "SLURM_STEP_NODELIST": "gpu[07-09,12],cpu1",
         "SLURM_NTASKS": "4", "SLURM_PROCID": "3", "SLURM_LOCALID": "0"}
  got = multihost.layout({}, env)
  assert got == multihost.Layout("gpu07:61445", 4, 3, "SLURM")
  assert multihost.layout({}, dict(env, SLURM_NTASKS="1")) is None
  assert multihost.layout({}, {}) is None
  with pytest.raises(UserError, match="SLURM_PROCID=4 must be below SLURM_NTASKS=4"):
    multihost.layout({}, dict(env, SLURM_PROCID="4"))
  with pytest.raises(UserError, match="--coordinator_address given without --num_processes"):
    multihost.layout({"coordinator_address": "127.0.0.1:1"}, {})
  with pytest.raises(UserError, match="HOST:PORT"):
    multihost.layout({"coordinator_address": "127.0.0.1", "num_processes": "2",
                      "process_id": "1"}, {})
  # flags win over SLURM's variables
  flags = {"coordinator_address": "127.0.0.1:1234", "num_processes": "2", "process_id": "1"}
  assert multihost.layout(flags, env) == multihost.Layout("127.0.0.1:1234", 2, 1, "flags")
  with pytest.raises(UserError, match="global batch size=6 is not divisible by the 4 processes"):
    monkeypatch.setattr(jax, "process_count", lambda: 4)
    multihost.check_divides(6, "the global batch size")


def test_coordinator_that_never_answers_is_one_line(tmp_path):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]  # NOTE: closed again: nothing listens there
  env = _env(2, tmp_path / "cache")
  start = time.monotonic()
  proc = subprocess.run(
      [sys.executable, *_train_args(tmp_path / "run"), f"--coordinator_address=127.0.0.1:{port}",
       "--num_processes=2", "--process_id=1", "--initialization_timeout=3"],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and f"coordinator 127.0.0.1:{port} did not answer within 3 s" in lines[0]
  assert time.monotonic() - start < 60
  assert not (tmp_path / "run").exists()


def test_dera_sweep_on_two_processes_matches_one(tiny_sft_dir, tmp_path):
  """The processes split the prompt batches; process 0 writes every row, as one process would.

  8 prompts in batches of 3: batches 0 and 2 (5 prompts) on process 0, batch 1
  (3 prompts) on process 1, which sits the second round out.
  """
  cache = tmp_path / "jax_cache"

  def args(out):
    return ["-m", "realign_jax.decode", "--gin_file=configs/decode/dera_builtin_tiny.gin",
            f"--gin.REF_CHECKPOINT='{tiny_sft_dir}'", f"--gin.ALIGNED_CHECKPOINT='{tiny_sft_dir}'",
            f"--gin.OUTPUT_FILE='{out}'", "--gin.LAMBDAS=[0.0, 1.0]", "--gin.decode.max_prompts=8",
            "--gin.decode.batch_size=3", "--gin.SamplingConfig.max_new_tokens=8"]

  # NOTE: each process decodes on its own 2 devices; the one-process run on 2 devices
  # too runs the very same program, so the rows match to the last bit (on 4 devices
  # a batch of 3 is laid out otherwise and log-probs move in the last float32 place).
  one = BinaryRun(args(tmp_path / "one.jsonl"), env=_env(2, cache), cwd=REPO_ROOT,
                  log_prefix=str(tmp_path / "one"), nice=True)
  job = _free_slurm_job_id()
  two = [BinaryRun(args(tmp_path / "two.jsonl"), env=_env(2, cache, _slurm(job, rank)),
                   cwd=REPO_ROOT, log_prefix=str(tmp_path / f"two.p{rank}")) for rank in (0, 1)]
  _wait_all(two + [one])
  for r in two + [one]:
    assert r.returncode == 0, r.describe()
  with open(tmp_path / "one.jsonl") as f:
    rows_one = [json.loads(line) for line in f]
  with open(tmp_path / "two.jsonl") as f:
    rows_two = [json.loads(line) for line in f]
  assert len(rows_one) == 8 * 2
  assert rows_two == rows_one
  for rank, here in ((0, 5), (1, 3)):
    assert (f"process {rank} of 2 decoded {here} of 8 prompts" in two[rank].stdout
            ), two[rank].describe()
  # NOTE: the operative config beside the output, written by the binary (process 0)
  config = (tmp_path / "two.jsonl.config.gin").read_text()
  assert "LAMBDAS = [0.0, 1.0]" in config.splitlines() and "DeRa.lambdas = %LAMBDAS" in config


def test_batch_not_divisible_by_the_processes_is_one_line(tmp_path):
  job = _free_slurm_job_id()
  model_dir = tmp_path / "run"
  args = _train_args(model_dir) + ["--gin.SFT.batch_size=7"]
  runs = _wait_all([BinaryRun(args, env=_env(2, tmp_path / "cache", _slurm(job, rank)),
                              cwd=REPO_ROOT, log_prefix=str(tmp_path / f"p{rank}"))
                    for rank in (0, 1)], timeout=120)
  for r in runs:
    assert r.returncode == 2, r.describe()
    lines = r.stderr.strip().splitlines()
    assert lines == ["error: SFT.batch_size=7 is not divisible by the 2 processes of this run; "
                     "use a multiple of 2"], r.describe()
  assert not model_dir.exists() or os.listdir(model_dir) == []


# ---- PPO, DPO and value training: 2 processes x 2 devices against 1 process x 4 -------------
# NOTE: the shared tiny SFT run's architecture (tests/helpers.TINY_BUILTIN["t5"]), which the
# configs' model (gin/models/t5_tiny.gin) is overridden to, so that it starts every run.
_TINY_T5 = ["--gin.T5Config.d_model=32", "--gin.T5Config.num_heads=2",
            "--gin.T5Config.head_dim=16", "--gin.T5Config.d_ff=64",
            "--gin.T5Config.num_encoder_layers=1", "--gin.T5Config.num_decoder_layers=1",
            "--gin.T5Config.dropout_rate=0.0"]
_ALGO_STEPS = 2
_COMMON = [f"--gin.TRAIN_STEPS={_ALGO_STEPS}", "--gin.TrainerConfig.log_every=1",
           "--gin.TrainerConfig.eval_every=0", "--gin.TrainerConfig.checkpoint_every=1000",
           "--gin.TrainerConfig.async_checkpoint=False", "--gin.TrainerConfig.progress=False"]


def _algorithm_args(name, model_dir, sft_dir, pref_dir) -> list:
  if name == "ppo":
    extra = ["--gin_file=configs/ppo/length_builtin_tiny.gin",
             f"--gin.INIT_CHECKPOINT='{sft_dir}'", "--gin.PPO.batch_size=8",
             "--gin.PPO.input_length=32", "--gin.PPO.max_new_tokens=6",
             "--gin.PPO.max_eval_examples=0", "--gin.PPO.num_eval_samples=0",
             # NOTE: SGD here: under Adam a weight whose gradient is float32 noise (about
             # 1e-9, summed in another order on 2 processes) still moves by about the
             # learning rate, m / sqrt(v) being its sign: measured 5e-5 on one weight of
             # the 1-process and 2-process runs while their losses agree to 2e-6. With
             # SGD a parameter's difference is the learning rate times its gradient's.
             "--gin.make_optimizer.name='sgd'", "--gin.make_optimizer.learning_rate=0.1"]
  elif name == "dpo":
    extra = ["--gin_file=configs/dpo/builtin_tiny.gin", f"--gin.INIT_CHECKPOINT='{sft_dir}'",
             f"--gin.PREFERENCE_DIR='{pref_dir}'", "--gin.DPO.batch_size=8",
             "--gin.DPO.input_length=16", "--gin.DPO.target_length=8",
             "--gin.DPO.eval_batch_size=8"]
  else:
    extra = ["--gin_file=configs/value/fudge_builtin_tiny.gin",
             f"--gin.REFERENCE_CHECKPOINT='{sft_dir}'", "--gin.FudgeValue.batch_size=8",
             "--gin.FudgeValue.input_length=32", "--gin.FudgeValue.max_new_tokens=6"]
  # NOTE: PPO and DPO evaluate once, at the last step: per-prompt outputs of a program on
  # the global mesh, spread over the processes, that every process has to read whole.
  evals = {"ppo": ["--gin.PPO.max_eval_examples=8", f"--gin.TrainerConfig.eval_every={_ALGO_STEPS}"],
           "dpo": [f"--gin.TrainerConfig.eval_every={_ALGO_STEPS}"]}.get(name, [])
  return ["-m", "realign_jax.train", f"--gin.MODEL_DIR='{model_dir}'", *extra, *_TINY_T5,
          *_COMMON, *evals]


@pytest.fixture(scope="module")
def algorithm_runs(tmp_path_factory, tiny_sft_dir):
  """{name: (1-process run dir, 2-process run dir)} for PPO, DPO and CD-FUDGE value training."""
  from realign_jax.data import preferences
  tmp = tmp_path_factory.mktemp("multihost_algorithms")
  cache = tmp / "jax_cache"
  pref_dir = tmp / "prefs"
  rng = random.Random(0)
  words = ["alpha", "beta", "gamma", "delta", "sum", "list", "file", "return", "value", "path"]
  for split, n in (("train", 32), ("validation", 8), ("test", 8)):
    preferences.write_preference_jsonl(pref_dir / f"{split}.jsonl", [
        {"prompt": " ".join(rng.choices(words, k=6)), "chosen": " ".join(rng.choices(words, k=3)),
         "rejected": " ".join(rng.choices(words, k=4))} for _ in range(n)])
  out = {}
  for name in ("ppo", "dpo", "value"):
    one, two = tmp / f"{name}_one", tmp / f"{name}_two"
    # NOTE: not at a lower priority: beside another test worker it would wait too long.
    ref = BinaryRun(_algorithm_args(name, one, tiny_sft_dir, pref_dir), env=_env(4, cache),
                    cwd=REPO_ROOT, log_prefix=str(tmp / f"{name}_one"))
    job = _free_slurm_job_id()
    pair = [BinaryRun(_algorithm_args(name, two, tiny_sft_dir, pref_dir),
                      env=_env(2, cache, _slurm(job, rank)), cwd=REPO_ROOT,
                      log_prefix=str(tmp / f"{name}_two.p{rank}")) for rank in (0, 1)]
    _wait_all(pair + [ref])
    for r in pair + [ref]:
      assert r.returncode == 0, r.describe()
    out[name] = (one, two)
  return out


@pytest.mark.parametrize("name", ["ppo", "dpo", "value"])
def test_algorithm_on_two_processes_matches_one(algorithm_runs, name):
  one, two = algorithm_runs[name]
  a, b = load_run_params(one), load_run_params(two)
  diffs = jax.tree_util.tree_map(lambda x, y: float(np.max(np.abs(x - y))), a, b)
  assert max(jax.tree_util.tree_leaves(diffs)) < 1e-5, diffs
  rows_one, rows_two = _records(one), _records(two)
  steps = [r["step"] for r in rows_two if r["split"] == "train"]
  assert steps == list(range(1, _ALGO_STEPS + 1))  # each record once: process 0 writes
  ref = {(r["split"], r["step"]): r for r in rows_one}
  assert sorted(ref) == sorted((r["split"], r["step"]) for r in rows_two)
  if name in ("ppo", "dpo"):
    assert ("eval", _ALGO_STEPS) in ref  # an evaluation on both
  for r in rows_two:
    want = ref[r["split"], r["step"]]
    for k, v in r.items():
      if isinstance(v, float) and "per_s" not in k and "seconds" not in k and k != "time":
        assert v == pytest.approx(want[k], rel=1e-4, abs=1e-5), (k, r, want)
  assert (two / "config.gin").read_text().strip()
