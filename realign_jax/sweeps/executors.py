"""Where a sweep's runs execute: local subprocesses, or a SLURM job array through submitit.

Both hand each run to `runner.run_one` (retries, status file); neither
schedules anything itself: the local one is a `concurrent.futures` thread
pool of subprocesses, the SLURM one is submitit's `map_array`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from typing import Callable, Optional, Sequence

from realign_jax.plumbing.errors import UserError
from realign_jax.sweeps import runner

Report = Callable[[runner.RunResult], None]


class LocalExecutor:
  """`parallel` runs at a time on this machine, each a subprocess.

  NOTE: one run at a time is the default because a training run already
  uses every core (or accelerator) it sees; raise it for small CPU runs.
  """

  def __init__(self, parallel: int = 1):
    if not isinstance(parallel, int) or isinstance(parallel, bool) or parallel < 1:
      raise UserError(f"LocalExecutor.parallel = {parallel!r} must be an integer >= 1")
    self.parallel = parallel

  def describe(self) -> str:
    return f"local, {self.parallel} at a time"

  def check(self) -> None:
    pass

  def run(self, jobs: Sequence[runner.RunJob], report: Report, root: str) -> list:
    del root
    processes = runner.Processes()
    results = []
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=self.parallel)
    of = {pool.submit(runner.run_one, job, processes): job for job in jobs}
    pending = set(of)
    try:
      while pending:
        # NOTE: a timeout, so that SIGINT/SIGTERM reach the main thread promptly.
        done, pending = concurrent.futures.wait(
            pending, timeout=1.0, return_when=concurrent.futures.FIRST_COMPLETED)
        for f in done:
          try:
            res = f.result()
          except Exception as e:  # pylint: disable=broad-except
            # NOTE: e.g. a run directory that cannot be written: that run fails, not the sweep.
            res = runner.RunResult(of[f].name, "failed", None, 0, 0.0,
                                   f"{type(e).__name__}: {e}")
          results.append(res)
          report(res)
    except BaseException:
      for f in pending:
        f.cancel()
      processes.stop()
      raise
    finally:
      pool.shutdown(wait=True, cancel_futures=True)
    return results


class SlurmExecutor:
  """One SLURM job array (submitit), one array task per run; waits for them by default.

  A run that needs several hosts sets `nodes` (and `tasks_per_node`): every
  task starts the binary, which joins the others through
  `jax.distributed.initialize()` (SLURM's variables); task 0 writes the records.
  `cluster`: 'slurm'; 'local' runs the same array as local processes through
  submitit (a check of this path without a cluster).
  """

  def __init__(self, partition: Optional[str] = None, account: Optional[str] = None,
               gpus_per_node: int = 0, cpus_per_task: Optional[int] = None,
               time_min: int = 60, nodes: int = 1, tasks_per_node: int = 1,
               mem_gb: Optional[float] = None, array_parallelism: int = 256,
               setup: Sequence[str] = (), cluster: str = "slurm", wait: bool = True):
    if cluster not in ("slurm", "local", "debug"):
      raise UserError(f"SlurmExecutor.cluster = {cluster!r}; use 'slurm' (or 'local' or "
                      f"'debug' to try the array on this machine)")
    for name, v in (("time_min", time_min), ("nodes", nodes), ("tasks_per_node", tasks_per_node),
                    ("array_parallelism", array_parallelism)):
      if not isinstance(v, int) or v < 1:
        raise UserError(f"SlurmExecutor.{name} = {v!r} must be an integer >= 1")
    if not isinstance(gpus_per_node, int) or gpus_per_node < 0:
      raise UserError(f"SlurmExecutor.gpus_per_node = {gpus_per_node!r} must be an integer >= 0")
    self.partition, self.account = partition, account
    self.gpus_per_node, self.cpus_per_task = gpus_per_node, cpus_per_task
    self.time_min, self.nodes, self.tasks_per_node = time_min, nodes, tasks_per_node
    self.mem_gb, self.array_parallelism = mem_gb, array_parallelism
    self.setup, self.cluster, self.wait = list(setup), cluster, wait

  def describe(self) -> str:
    return (f"SLURM job array ({self.cluster}): partition {self.partition}, account "
            f"{self.account}, {self.nodes} node(s) x {self.gpus_per_node} GPU(s), "
            f"{self.time_min} min")

  def check(self) -> None:
    """Before anything is submitted: a SLURM cluster must be reachable from here."""
    import shutil
    if self.cluster == "slurm" and shutil.which("srun") is None:
      raise UserError("SlurmExecutor: no `srun` on this machine's PATH; run the sweep on a SLURM "
                      "login node (or try the array here with SlurmExecutor.cluster = 'local')")

  def make(self, folder: str):
    """The submitit executor with this executor's settings."""
    import submitit
    ex = submitit.AutoExecutor(folder=folder, cluster=self.cluster)
    params = dict(timeout_min=self.time_min, nodes=self.nodes,
                  tasks_per_node=self.tasks_per_node,
                  slurm_array_parallelism=self.array_parallelism)
    if self.gpus_per_node:
      params["gpus_per_node"] = self.gpus_per_node
    if self.cpus_per_task is not None:
      params["cpus_per_task"] = self.cpus_per_task
    if self.mem_gb is not None:
      params["mem_gb"] = self.mem_gb
    if self.partition is not None:
      params["slurm_partition"] = self.partition
    if self.account is not None:
      params["slurm_account"] = self.account
    if self.setup:
      params["slurm_setup"] = self.setup
    ex.update_parameters(**params)
    return ex

  def run(self, jobs: Sequence[runner.RunJob], report: Report, root: str) -> list:
    ex = self.make(os.path.join(root, "slurm", "%j"))
    if self.nodes * self.tasks_per_node > 1:
      # NOTE: the tasks of a multi-host run start the binary together; one task retrying
      # alone would wait for hosts that have left. A rerun of the sweep resumes it instead.
      jobs = [dataclasses.replace(j, max_retries=0) for j in jobs]
    submitted = ex.map_array(runner.run_one, list(jobs))
    ids = [j.job_id for j in submitted]
    print(f"submitted {len(ids)} array tasks: {ids[0]}{' ... ' + ids[-1] if len(ids) > 1 else ''}",
          flush=True)
    if not self.wait:
      return []
    results = []
    for job, sj in zip(jobs, submitted):
      try:
        r = sj.result()
        # NOTE: a multi-task job returns one result per task; task 0 speaks for the run.
        r = r[0] if isinstance(r, list) else r
      except Exception as e:  # pylint: disable=broad-except
        text = str(e).strip().splitlines()
        r = runner.RunResult(job.name, "failed", None, 1, 0.0,
                             f"{type(e).__name__}: {text[-1] if text else ''}")
      results.append(r)
      report(r)
    return results
