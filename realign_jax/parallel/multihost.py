"""Starting a binary on several hosts: `jax.distributed` from flags, SLURM or a TPU pod.

Where the process layout comes from, first match wins:

  1. flags `--coordinator_address=HOST:PORT --num_processes=N --process_id=I`
     (t5x's multi-process flags; the binaries take them off the command line),
  2. the environment `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`,
     `JAX_PROCESS_ID` (what the multi-GPU launcher under scripts/ sets),
  3. SLURM (`SLURM_JOB_ID`, `SLURM_STEP_NODELIST`, `SLURM_NTASKS`,
     `SLURM_PROCID`, `SLURM_LOCALID`): the coordinator is the step's first node,
     its port `61440 + SLURM_JOB_ID % 4096` (the port JAX's own SLURM detection
     uses, so every task of a job agrees on it without talking),
  4. a TPU pod or multi-slice job (`TPU_WORKER_HOSTNAMES`,
     `MEGASCALE_COORDINATOR_ADDRESS`): JAX detects the layout itself.

Nothing found (or one process): a single-host run, nothing is initialised.

A coordinator that never answers ends the run with one line after
`--initialization_timeout` seconds (default 300, JAX's), not a hang: JAX aborts
the process with a native stack trace when registration times out, so the
other processes first wait for the coordinator's port to accept connections.
"""

import dataclasses
import logging
import os
import re
import socket
import time
from typing import Mapping, Optional

from realign_jax.plumbing.errors import UserError

# The binaries' command-line flags that belong here (t5x spells them so).
FLAGS = ("coordinator_address", "num_processes", "process_id", "initialization_timeout")
DEFAULT_TIMEOUT_S = 300
SLURM_PORT_BASE, SLURM_PORT_RANGE = 61440, 4096

_state = {"initialized": False}


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where this process sits in a multi-host run."""
  coordinator_address: str  # HOST:PORT of process 0's coordination service
  num_processes: int
  process_id: int
  source: str  # "flags", "environment", "SLURM"
  local_device_ids: Optional[tuple] = None


def split_flags(argv):
  """(argv without the multi-host flags, {flag: value}); `--flag=V` or `--flag V`."""
  rest, flags = [], {}
  it = iter(argv)
  for a in it:
    name = a[2:].split("=", 1)[0] if a.startswith("--") else None
    if name not in FLAGS:
      rest.append(a)
      continue
    if "=" in a:
      flags[name] = a.split("=", 1)[1]
    else:
      value = next(it, None)
      if value is None:
        raise UserError(f"--{name} needs a value")
      flags[name] = value
  return rest, flags


def _int(value, what: str, minimum: int) -> int:
  try:
    n = int(value)
  except (TypeError, ValueError):
    raise UserError(f"{what}={value!r} is not an integer") from None
  if n < minimum:
    raise UserError(f"{what}={n} must be >= {minimum}")
  return n


def _check_address(address: str, what: str) -> str:
  host, sep, port = address.rpartition(":")
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise UserError(f"{what}={address!r} must look like HOST:PORT (e.g. 10.0.0.2:1234)")
  return address


def first_slurm_host(nodelist: str) -> str:
  """The first host of a SLURM node list: `node[03-05,9],gpu1` -> `node03`."""
  nodelist = nodelist.strip()
  m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
  if not m or not m.group(1):
    raise UserError(f"SLURM_STEP_NODELIST={nodelist!r} names no host")
  prefix, ranges = m.group(1), m.group(3)
  if not ranges:
    return prefix
  return prefix + ranges.split(",")[0].split("-")[0]


def slurm_port(job_id) -> int:
  return SLURM_PORT_BASE + _int(job_id, "SLURM_JOB_ID", 0) % SLURM_PORT_RANGE


def _tasks_per_node(value: str) -> int:
  # NOTE: SLURM writes e.g. "2(x3),1" (2 tasks on each of 3 nodes, then 1).
  m = re.match(r"(\d+)", value or "")
  return int(m.group(1)) if m else 1


def layout(flags: Optional[Mapping[str, str]] = None,
           env: Optional[Mapping[str, str]] = None) -> Optional[Layout]:
  """This process's layout (see the module docstring); None for a single-host run."""
  flags = dict(flags or {})
  env = os.environ if env is None else env
  given = [k for k in ("coordinator_address", "num_processes", "process_id") if k in flags]
  if given:
    missing = [k for k in ("coordinator_address", "num_processes", "process_id")
               if k not in flags]
    if missing:
      raise UserError(f"--{given[0]} given without --{missing[0]} (a multi-host run needs "
                      "--coordinator_address, --num_processes and --process_id together)")
    return _checked(flags["coordinator_address"], flags["num_processes"], flags["process_id"],
                    "flags", ("--coordinator_address", "--num_processes", "--process_id"))
  names = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
  if env.get(names[0]) and env.get(names[1]):
    missing = [n for n in names if not env.get(n)]
    if missing:
      raise UserError(f"{names[0]} is set but {missing[0]} is not")
    return _checked(env[names[0]], env[names[1]], env[names[2]], "environment", names)
  if env.get("SLURM_JOB_ID") and env.get("SLURM_NTASKS"):
    ntasks = _int(env["SLURM_NTASKS"], "SLURM_NTASKS", 1)
    if ntasks == 1:
      return None
    for name in ("SLURM_STEP_NODELIST", "SLURM_PROCID"):
      if not env.get(name):
        raise UserError(f"SLURM_NTASKS={ntasks} but {name} is not set; start each task "
                        "with srun inside the allocation")
    host = first_slurm_host(env["SLURM_STEP_NODELIST"])
    address = f"{host}:{slurm_port(env['SLURM_JOB_ID'])}"
    local = None
    # NOTE: several tasks on one GPU node each take their own GPU.
    if (_tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE", "")) > 1
        and env.get("SLURM_LOCALID") and not env.get("JAX_PLATFORMS", "").startswith("cpu")):
      local = (_int(env["SLURM_LOCALID"], "SLURM_LOCALID", 0),)
    base = _checked(address, ntasks, env["SLURM_PROCID"], "SLURM",
                    ("SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID"))
    return dataclasses.replace(base, local_device_ids=local)
  return None


def _checked(address, num, pid, source, names) -> Layout:
  address = _check_address(str(address), names[0])
  num = _int(num, names[1], 1)
  pid = _int(pid, names[2], 0)
  if pid >= num:
    raise UserError(f"{names[2]}={pid} must be below {names[1]}={num}")
  return Layout(address, num, pid, source)


def tpu_pod(env: Optional[Mapping[str, str]] = None) -> bool:
  """Whether this is a worker of a multi-host TPU pod or a multi-slice job."""
  env = os.environ if env is None else env
  hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  return len(hosts) > 1 or bool(env.get("MEGASCALE_COORDINATOR_ADDRESS"))


def wait_for_coordinator(address: str, timeout_s: float) -> None:
  """Returns once HOST:PORT accepts a TCP connection; one-line UserError after `timeout_s`."""
  host, _, port = address.rpartition(":")
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host, int(port)), timeout=min(2.0, timeout_s)):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise UserError(
            f"coordinator {address} did not answer within {timeout_s:g} s ({e.strerror or e}); "
            "start process 0 there, or raise --initialization_timeout") from None
      time.sleep(0.2)


def initialize(flags: Optional[Mapping[str, str]] = None,
               env: Optional[Mapping[str, str]] = None) -> Optional[Layout]:
  """Initialises `jax.distributed` for a multi-host run; a no-op on one host (idempotent).

  Must run before anything asks JAX for its devices.
  """
  flags = dict(flags or {})
  timeout = _int(flags.get("initialization_timeout", DEFAULT_TIMEOUT_S),
                 "--initialization_timeout", 1)
  found = layout(flags, env)
  if _state["initialized"]:
    return found
  import jax  # pylint: disable=g-import-not-at-top
  if found is None:
    if not tpu_pod(env):
      return None
    jax.distributed.initialize(initialization_timeout=timeout)
  else:
    if found.process_id != 0:
      wait_for_coordinator(found.coordinator_address, timeout)
    jax.distributed.initialize(
        coordinator_address=found.coordinator_address, num_processes=found.num_processes,
        process_id=found.process_id, local_device_ids=found.local_device_ids,
        initialization_timeout=timeout)
  _state["initialized"] = True
  logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
  return found


def check_divides(global_batch: int, what: str) -> None:
  """One line when the process count does not divide a global batch size."""
  import jax  # pylint: disable=g-import-not-at-top
  n = jax.process_count()
  if global_batch % n:
    raise UserError(f"{what}={global_batch} is not divisible by the {n} processes of this run; "
                    f"use a multiple of {n}")


def is_primary() -> bool:
  """Whether this process writes the run's files (process 0)."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index() == 0


def any_process(flag: bool) -> bool:
  """Whether `flag` is set on any process (every process must call this at the same point)."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return bool(flag)
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.any(multihost_utils.process_allgather(np.int32(bool(flag)))))


def barrier(name: str, timeout_s: float = 3600) -> None:
  """Waits until every process reaches this point (no-op on one).

  Through the coordination service, not a device collective: CPU collectives
  (gloo) give up after 30 s when one process arrives that much later, e.g.
  while another is still compiling.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return
  _state["barriers"] = _state.get("barriers", 0) + 1
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  client = distributed.global_state.client
  if client is None:  # NOTE: a pod initialised by someone else's code
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)
    return
  client.wait_at_barrier(f"realign_jax:{name}:{_state['barriers']}", int(timeout_s * 1000))


def process_rows(mesh, global_batch: int) -> slice:
  """The rows of a global batch that this process's devices hold under the batch sharding.

  Every process computes the same global batch (same seed and step) and feeds
  only these rows, so a run's data does not depend on its number of hosts.
  """
  # NOTE: lazy: JAX and Flax; this module is imported by the argument precheck (cli.py).
  from realign_jax.parallel import partitioning  # pylint: disable=g-import-not-at-top
  check_divides(global_batch, "the global batch size")
  index_map = partitioning.batch_sharding(mesh).addressable_devices_indices_map((global_batch,))
  starts = sorted({(idx[0].start or 0, global_batch if idx[0].stop is None else idx[0].stop)
                   for idx in index_map.values()})
  # NOTE: the process's devices hold one contiguous block of the data axis on
  # every mesh `partitioning.create_mesh` builds; anything else is refused
  # rather than fed misplaced rows.
  lo, hi = starts[0][0], starts[-1][1]
  covered = sum(b - a for a, b in starts)
  if covered != hi - lo:
    raise UserError(f"this process's devices hold a non-contiguous part of the batch "
                    f"({starts}); build the mesh with the processes' devices in order")
  return slice(lo, hi)


def host_rows(batches, mesh, global_batch: int):
  """Each global batch of `batches` cut to this process's rows (see `process_rows`)."""
  rows = process_rows(mesh, global_batch)
  for batch in batches:
    yield {k: v[rows] for k, v in batch.items()}


def gather(tree):
  """Every process's `tree` (host arrays, the same shapes on every process), stacked [P, ...].

  A collective: every process calls it, in the same order (the decode binary
  gathers each round of its per-process batches with it).
  """
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return multihost_utils.process_allgather(tree)


def fetch(tree):
  """`tree`'s arrays as host numpy values, whole on every process.

  An array spread over several processes' devices (a per-example output of a
  program on the global mesh) cannot be read by one process alone
  (`jax.device_get` refuses it): it is all-gathered, a collective that every
  process reaches in the same order. Replicated or local arrays are read as is.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
  return jax.tree_util.tree_map(one, tree)


def process_slot() -> tuple:
  """(number of processes, this process's index): how a loop splits its work over hosts."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_count(), jax.process_index()


def gather_objects(obj, timeout_s: float = 24 * 3600) -> list:
  """Every process's JSON-serialisable `obj`, in process order, on every process.

  For results computed on the host (text rewards, a judge's verdicts) that
  processes finish far apart: they first meet at a `barrier` (a CPU collective
  alone would give up after 30 s), then swap their JSON texts in two gathers.
  A collective: every process calls it, in the same order.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return [obj]
  import json  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  data = np.frombuffer(json.dumps(obj).encode("utf-8"), np.uint8)
  barrier("gather_objects", timeout_s)
  sizes = np.asarray(gather(np.int32(data.size))).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:data.size] = data
  texts = np.asarray(gather(padded))
  return [json.loads(bytes(texts[q, :sizes[q]]).decode("utf-8")) for q in range(len(sizes))]


def broadcast_object(obj, timeout_s: float = 24 * 3600):
  """Process 0's JSON-serialisable `obj`, on every process (`obj` itself on one process).

  For decisions that every process must take alike (e.g. whether a study's
  stage is cached: process 0 reads its marker, the others follow). A
  collective: every process calls it, in the same order; the others' `obj` is
  ignored.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return obj
  return gather_objects(obj if jax.process_index() == 0 else None, timeout_s)[0]
