"""The harness of every two-process scenario: a binary on 2 processes x 2 CPU devices,
started as SLURM starts them (coordinator on 127.0.0.1), beside the same command on
1 process x 4 devices, whose outputs the two processes must reproduce.

The coordinator listens on 127.0.0.1 only, on a port that the test makes free
(SLURM's port is derived from SLURM_JOB_ID, so the harness picks the job id).
Used by tests/test_multihost.py, tests/test_multihost_builders.py and
tests/test_study_multihost.py.
"""

import json
import random
import socket
import subprocess
import time

import pytest

from realign_jax.parallel import multihost
from tests.helpers import REPO_ROOT, BinaryRun, binary_env

# The global device count of every scenario: 2 processes x 2, or 1 process x 4.
DEVICES = 4


def slurm_job_ids(n: int) -> list:
  """n SLURM_JOB_IDs whose coordinator ports (61440 + id % 4096) differ and are free.

  NOTE: all n are drawn in one call: a port is free until its coordinator
  listens, so two separate calls made before then could return the same one.
  """
  rng = random.Random(time.monotonic_ns())
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


def slurm_env(job_id: str, rank: int, ntasks: int = 2) -> dict:
  """SLURM's variables for task `rank` of a job step on this host."""
  return {"SLURM_JOB_ID": job_id, "SLURM_STEP_NODELIST": "127.0.0.1",
          "SLURM_NTASKS": str(ntasks), "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)}


def start_two(args, log_prefix: str, job_id: str = None,
              devices_each: int = DEVICES // 2) -> list:
  """`python ARGS...` as processes 0 and 1 of a 2-process job, `devices_each` devices each.

  `args` is one argument list, or a function of the rank (each process its own
  output paths).
  """
  job_id = job_id or slurm_job_ids(1)[0]
  args_of = args if callable(args) else (lambda rank: args)
  return [BinaryRun(args_of(rank), env=binary_env(devices_each, extra=slurm_env(job_id, rank)),
                    cwd=REPO_ROOT, log_prefix=f"{log_prefix}.p{rank}") for rank in (0, 1)]


def start_one(args, log_prefix: str, devices: int = DEVICES, nice: bool = False) -> BinaryRun:
  """`python ARGS...` on 1 process with `devices` devices (the reference of a pair)."""
  return BinaryRun(args, env=binary_env(devices), cwd=REPO_ROOT, log_prefix=log_prefix,
                   nice=nice)


def start_one_and_two(args_of, log_prefix: str, job_id: str = None, one_devices: int = DEVICES,
                      nice_one: bool = False) -> tuple:
  """The scenario: (the 1-process run, [process 0, process 1]), all started at once.

  `args_of(slot)` gives each its arguments; slot is "one", 0 or 1.
  """
  one = start_one(args_of("one"), f"{log_prefix}_one", devices=one_devices, nice=nice_one)
  return one, start_two(args_of, f"{log_prefix}_two", job_id)


# Runs binaries' main(argv) one after another in one process: argv[1] is a JSON list of
# [module, argv] pairs; a failing main ends the process (a traceback, or its exit code).
_MAINS = """
import importlib, json, sys
import gin
for module, argv in json.loads(sys.argv[1]):
  gin.clear_config()  # NOTE: unlocks gin for the next binary's configurables
  code = importlib.import_module(module).main(argv)
  if code:
    sys.exit(code)
"""


def mains_args(runs) -> list:
  """`python ARGS...` that runs each binary run of `runs` (each `-m MODULE ARGV...`) in turn
  in one process, through the binary's main(argv).

  NOTE: for a scenario of several runs of one binary: each process costs about
  7 CPU-s of imports before it computes anything, so three runs in one 1-process
  and one 2-process job save six process starts. The runs share the process's
  jax.distributed (initialised once) and its compiled programs.
  """
  pairs = []
  for args in runs:
    assert args[0] == "-m", args
    pairs.append([args[1], [str(a) for a in args[2:]]])
  return ["-c", _MAINS, json.dumps(pairs)]


def wait_all(runs, timeout: float) -> list:
  """Waits for every run; on a timeout kills them all (only these) and fails the test."""
  deadline = time.monotonic() + timeout
  try:
    for r in runs:
      r.wait(timeout=max(1.0, deadline - time.monotonic()))
  except subprocess.TimeoutExpired:
    for r in runs:
      if r.running():
        r.proc.kill()  # only the processes this test started
        r.proc.wait()
    pytest.fail("a multi-process run did not finish in time:\n" +
                "\n".join(r.wait().describe() for r in runs))
  return runs


def assert_all_succeeded(runs) -> None:
  for r in runs:
    assert r.returncode == 0, r.describe()
