"""Multi-host runs on localhost: 2 processes x 2 simulated CPU devices, started as SLURM
starts them, against the same command on 1 process x 4 devices (tests/multiprocess.py).

The train binary's shared run (conftest.train_run: the tiny SFT config, 1 process x
4 devices) is run again on 2 processes, stopped by a SIGTERM sent to process 1 alone,
then resumed; its final parameters must match the shared run's (the same global batch
and seed), and every file of the run must have been written once (no duplicated
metrics record). The decode binary's sweep and PPO, DPO and value training run the
same way.
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

from realign_jax import train as train_bin
from realign_jax.plumbing.errors import UserError
from realign_jax.parallel import multihost
from tests import multiprocess
from tests.helpers import (REPO_ROOT, TINY_T5_GIN, TRAIN_RUN_STEPS, assert_one_line_error,
                           binary_env, load_run_params, run_main, train_run_args)

TIMEOUT_S = 240
STEPS = TRAIN_RUN_STEPS


def _records(model_dir) -> list:
  with open(os.path.join(model_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _rows_up_to(rows, step) -> list:
  return [r for r in rows if r["step"] <= step]


def _preemptible_args(model_dir) -> list:
  # NOTE: no periodic checkpoint and no evaluation: the SIGTERM's is the one checkpoint
  # before the end; saved synchronously.
  return train_run_args(model_dir) + [
      "--gin.TrainerConfig.checkpoint_every=1000", "--gin.TrainerConfig.async_checkpoint=False",
      "--gin.TrainerConfig.eval_every=0"]


@pytest.fixture(scope="module")
def runs(train_run, tmp_path_factory):
  """(the shared 1-process run, the 2-process run dir, the SIGTERM'd processes, their
  records then, the resumed processes)."""
  tmp = tmp_path_factory.mktemp("multihost")
  two = tmp / "two"
  first = multiprocess.start_two(_preemptible_args(two), str(tmp / "first"))
  metrics = two / "metrics.jsonl"
  deadline = time.monotonic() + TIMEOUT_S
  while time.monotonic() < deadline and all(r.running() for r in first):
    if metrics.exists() and metrics.read_text().count("\n") >= 1:
      first[1].proc.send_signal(signal.SIGTERM)  # one host only
      break
    time.sleep(0.05)
  multiprocess.wait_all(first, TIMEOUT_S)
  term_rows = _records(two)
  resumed = multiprocess.wait_all(
      multiprocess.start_two(_preemptible_args(two), str(tmp / "resumed")), TIMEOUT_S)
  return train_run.model_dir, two, first, term_rows, resumed


def _saved_step(first) -> int:
  line = first[0].stderr.strip().splitlines()[-1]
  return int(line.split("saved checkpoint at step ")[1].split()[0])


def test_sigterm_on_one_host_saves_the_same_step_on_every_host(runs):
  _, two, first, term_rows, _ = runs
  codes = [r.returncode for r in first]
  assert codes == [143, 143], "\n".join(r.describe() for r in first)
  saved = {r.stderr.strip().splitlines()[-1] for r in first}
  assert len(saved) == 1 and "SIGTERM: saved checkpoint at step" in saved.pop()
  assert not any("Traceback" in r.stderr for r in first)
  # The checkpoint is of the step the run had reached (its last logged step).
  step = _saved_step(first)
  assert step == max(r["step"] for r in term_rows if r["split"] == "train") < STEPS
  # NOTE: written when training started: the preempted run never reached its end.
  assert (two / "config.gin").read_text().strip()


def test_resumed_two_process_run_matches_one_process(runs):
  one, two, first, term_rows, resumed = runs
  assert [r.returncode for r in resumed] == [0, 0], "\n".join(r.describe() for r in resumed)
  a, b = load_run_params(one), load_run_params(two)
  diffs = jax.tree_util.tree_map(lambda x, y: float(np.max(np.abs(x - y))), a, b)
  worst = max(jax.tree_util.tree_leaves(diffs))
  assert worst < 1e-5, diffs
  # The rerun kept the preempted run's rows up to its checkpoint: it resumed from there.
  step = _saved_step(first)
  assert _rows_up_to(_records(two), step) == _rows_up_to(term_rows, step)


def test_every_record_written_once_by_process_zero(runs):
  one, two, first, _, resumed = runs
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
  start = time.monotonic()
  proc = subprocess.run(
      [sys.executable, *train_run_args(tmp_path / "run"),
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", "--process_id=1",
       "--initialization_timeout=3"],
      cwd=REPO_ROOT, env=binary_env(2), capture_output=True, text=True, timeout=120)
  assert_one_line_error(proc.returncode, proc.stdout, proc.stderr,
                        [f"coordinator 127.0.0.1:{port} did not answer within 3 s"])
  assert time.monotonic() - start < 60
  assert not (tmp_path / "run").exists()


def test_dera_sweep_on_two_processes_matches_one(tiny_sft_dir, tmp_path):
  """The processes split the prompt batches; process 0 writes every row, as one process would.

  8 prompts in batches of 3: batches 0 and 2 (5 prompts) on process 0, batch 1
  (3 prompts) on process 1, which sits the second round out.
  """
  def args(slot):
    out = tmp_path / ("one.jsonl" if slot == "one" else "two.jsonl")
    return ["-m", "realign_jax.decode", "--gin_file=configs/decode/dera_builtin_tiny.gin",
            f"--gin.REF_CHECKPOINT='{tiny_sft_dir}'", f"--gin.ALIGNED_CHECKPOINT='{tiny_sft_dir}'",
            f"--gin.OUTPUT_FILE='{out}'", "--gin.LAMBDAS=[0.0, 1.0]", "--gin.decode.max_prompts=8",
            "--gin.decode.batch_size=3", "--gin.SamplingConfig.max_new_tokens=8"]

  # NOTE: each process decodes on its own 2 devices; the one-process run on 2 devices
  # too runs the very same program, so the rows match to the last bit (on 4 devices
  # a batch of 3 is laid out otherwise and log-probs move in the last float32 place).
  one, two = multiprocess.start_one_and_two(args, str(tmp_path / "dera"), one_devices=2,
                                            nice_one=True)
  multiprocess.wait_all(two + [one], TIMEOUT_S)
  multiprocess.assert_all_succeeded(two + [one])
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


def test_batch_not_divisible_by_the_processes_is_one_line(tmp_path, monkeypatch, capsys):
  # NOTE: in this process, as process 0 of 2 would see it; the check comes before the
  # run directory or any collective (tests/test_study_multihost.py runs a refusal on
  # two processes).
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  model_dir = tmp_path / "run"
  capsys.readouterr()
  code = run_main(train_bin.main, train_run_args(model_dir)[2:] + ["--gin.SFT.batch_size=7"])
  out, err = capsys.readouterr()
  line = assert_one_line_error(code, out, err)
  assert line == ("error: SFT.batch_size=7 is not divisible by the 2 processes of this run; "
                  "use a multiple of 2")
  assert not model_dir.exists() or os.listdir(model_dir) == []


# ---- PPO, DPO and value training: 2 processes x 2 devices against 1 process x 4 -------------
# NOTE: the configs' model is the shared tiny SFT run's (tests.helpers.TINY_T5_GIN), which
# starts every run.
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
  return ["-m", "realign_jax.train", f"--gin.MODEL_DIR='{model_dir}'", *extra, *TINY_T5_GIN,
          *_COMMON, *evals]


ALGORITHMS = ("ppo", "dpo", "value")


@pytest.fixture(scope="module")
def algorithm_runs(tmp_path_factory, tiny_sft_dir):
  """{name: (1-process run dir, 2-process run dir)} for PPO, DPO and CD-FUDGE value training.

  NOTE: the three runs one after another in each process (multiprocess.mains_args): one
  1-process job and one 2-process job instead of three of each.
  """
  from realign_jax.data import preferences
  tmp = tmp_path_factory.mktemp("multihost_algorithms")
  pref_dir = tmp / "prefs"
  rng = random.Random(0)
  words = ["alpha", "beta", "gamma", "delta", "sum", "list", "file", "return", "value", "path"]
  for split, n in (("train", 32), ("validation", 8), ("test", 8)):
    preferences.write_preference_jsonl(pref_dir / f"{split}.jsonl", [
        {"prompt": " ".join(rng.choices(words, k=6)), "chosen": " ".join(rng.choices(words, k=3)),
         "rejected": " ".join(rng.choices(words, k=4))} for _ in range(n)])
  dirs = {name: (tmp / f"{name}_one", tmp / f"{name}_two") for name in ALGORITHMS}
  # NOTE: the 1-process job not at a lower priority: beside another test worker it would
  # wait too long.
  ref, pair = multiprocess.start_one_and_two(
      lambda slot: multiprocess.mains_args([
          _algorithm_args(name, dirs[name][0 if slot == "one" else 1], tiny_sft_dir, pref_dir)
          for name in ALGORITHMS]), str(tmp / "algorithms"))
  multiprocess.assert_all_succeeded(multiprocess.wait_all(pair + [ref], 2 * TIMEOUT_S))
  return dirs


@pytest.mark.parametrize("name", ALGORITHMS)
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
