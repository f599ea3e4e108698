"""One run of a sweep: the binary as a subprocess, retried, with a status file.

In the run directory:
  sweep_bindings.json   the run's bindings and command (written before it starts)
  sweep_logs/attempt-N.out, .err   each attempt's stdout and stderr
  sweep_status.json     written (atomically) when the run ends: status 'done'
                        (exit 0) or 'failed' (exit status, last stderr line)
A run whose status is 'done' is skipped by the next invocation of the sweep;
any other run (failed, or interrupted: no status) starts again in the same
directory, where the binaries resume from their own checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import threading
import time
from typing import Optional

STATUS_FILE = "sweep_status.json"
BINDINGS_FILE = "sweep_bindings.json"
LOG_DIR = "sweep_logs"
# NOTE: the binaries exit 2 on a configuration error (errors.UserError): a retry
# would fail the same way.
NOT_RETRIED_EXIT_CODES = (2,)


@dataclasses.dataclass(frozen=True)
class RunJob:
  """What a worker needs to run one run (picklable, for submitit)."""
  name: str
  run_dir: str
  command: tuple
  cwd: str
  max_retries: int
  bindings: dict


@dataclasses.dataclass(frozen=True)
class RunResult:
  name: str
  status: str                     # 'done', 'failed' or 'interrupted'
  exit_code: Optional[int]
  attempts: int
  seconds: float
  error: str = ""                 # the last line of the last attempt's stderr


def atomic_write_json(path: str, obj) -> None:
  from realign_jax.checkpoints.manager import atomic_write_text  # NOTE: lazy: JAX and orbax
  atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_status(run_dir: str) -> Optional[dict]:
  path = os.path.join(run_dir, STATUS_FILE)
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def is_done(run_dir: str) -> bool:
  status = read_status(run_dir)
  return bool(status) and status.get("status") == "done"


def recorded_bindings(run_dir: str) -> Optional[dict]:
  try:
    with open(os.path.join(run_dir, BINDINGS_FILE)) as f:
      return json.load(f)["bindings"]
  except (OSError, ValueError, KeyError):
    return None


def last_line(path: str) -> str:
  try:
    with open(path, "rb") as f:
      f.seek(0, os.SEEK_END)
      f.seek(max(0, f.tell() - 65536))
      lines = [l.strip() for l in f.read().decode("utf-8", "replace").splitlines()]
  except OSError:
    return ""
  lines = [l for l in lines if l]
  return lines[-1] if lines else ""


class Processes:
  """The live subprocesses of a local sweep, so that an interrupt can end them."""

  def __init__(self):
    self._lock = threading.Lock()
    self._live = set()
    self.stopping = False

  def start(self, *args, **kwargs) -> Optional[subprocess.Popen]:
    with self._lock:
      if self.stopping:
        return None
      proc = subprocess.Popen(*args, **kwargs)
      self._live.add(proc)
      return proc

  def finished(self, proc: subprocess.Popen) -> None:
    with self._lock:
      self._live.discard(proc)

  def stop(self, grace_s: float = 10.0) -> None:
    """No new starts; SIGTERM to every live run (the binaries save and exit), then SIGKILL."""
    with self._lock:
      self.stopping = True
      live = list(self._live)
    for p in live:
      if p.poll() is None:
        p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in live:
      try:
        p.wait(timeout=max(0.0, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def _primary() -> bool:
  # NOTE: a multi-node SLURM run starts this function in every task; only task 0
  # writes the records (the binaries coordinate their own hosts).
  return os.environ.get("SLURM_PROCID", "0") == "0"


def run_one(job: RunJob, processes: Optional[Processes] = None) -> RunResult:
  """Runs `job` until it exits 0 or has failed 1 + max_retries times."""
  processes = processes or Processes()
  primary = _primary()
  os.makedirs(os.path.join(job.run_dir, LOG_DIR), exist_ok=True)
  if primary:
    atomic_write_json(os.path.join(job.run_dir, BINDINGS_FILE),
                      {"name": job.name, "bindings": job.bindings, "command": list(job.command)})
  start = time.perf_counter()
  first = _next_attempt(job.run_dir)
  attempts, code, err_path = 0, None, ""
  task = "" if primary else f".task{os.environ.get('SLURM_PROCID')}"
  while attempts <= job.max_retries:
    n = first + attempts
    out_path = os.path.join(job.run_dir, LOG_DIR, f"attempt-{n}{task}.out")
    err_path = os.path.join(job.run_dir, LOG_DIR, f"attempt-{n}{task}.err")
    with open(out_path, "w") as out, open(err_path, "w") as err:
      proc = processes.start(list(job.command), cwd=job.cwd, stdout=out, stderr=err)
      if proc is None:
        break
      attempts += 1
      try:
        code = proc.wait()
      finally:
        processes.finished(proc)
    if code == 0 or processes.stopping or code in NOT_RETRIED_EXIT_CODES:
      break
  seconds = time.perf_counter() - start
  if processes.stopping and code != 0:
    return RunResult(job.name, "interrupted", code, attempts, seconds)
  result = RunResult(job.name, "done" if code == 0 else "failed", code, attempts, seconds,
                     "" if code == 0 else last_line(err_path))
  if primary:
    atomic_write_json(os.path.join(job.run_dir, STATUS_FILE), dataclasses.asdict(result))
  return result


def _next_attempt(run_dir: str) -> int:
  """Attempt numbers continue across invocations of the sweep (logs are never overwritten)."""
  names = os.listdir(os.path.join(run_dir, LOG_DIR))
  nums = [int(n[len("attempt-"):-len(".err")]) for n in names
          if n.startswith("attempt-") and n.endswith(".err") and
          n[len("attempt-"):-len(".err")].isdigit()]
  return max(nums, default=0) + 1
