r"""Sweep binary: a grid (and/or zip) of gin bindings times seeds over one base binary.

  python -m realign_jax.sweep --gin_file=configs/sweeps/ppo_beta_tiny.gin [--dry_run]
  python -m realign_jax.sweep --gin_file=configs/sweeps/ppo_beta_tiny.gin --aggregate

A sweep file binds `sweep.*` (see realign_jax/sweeps/plan.py and
configs/sweeps/): the binary, its gin files, fixed bindings, a grid and/or
zipped lists of bindings, the seeds and the binding that receives them, the
binding that receives each run's directory, and the executor (@LocalExecutor()
or @SlurmExecutor()). Each run gets a directory under `sweep.root` named from
its swept bindings (`BETA=0.1,SEED=1`), holding sweep_bindings.json.

Before anything starts, every binding is checked against the base config
(an unknown one is one line, exit 2). Finished runs are skipped, interrupted
ones start again in their directory (the binaries resume from their
checkpoints), failed ones are retried `sweep.max_retries` times; one failure
never stops the others. The sweep ends with a summary naming each failed run
and the last line of its stderr, then aggregates (aggregate.json,
aggregate.csv, a plot; see realign_jax/sweeps/aggregate.py); it exits 1 if a
run failed.

  --dry_run     print one line per run (name, state, command); start nothing
  --aggregate   only aggregate the runs that finished
"""

import sys

_USAGE = __doc__.split("\n\n")[0].strip() + "\n\n" + __doc__.split("\n\n", 1)[1].strip()
_FLAGS = ("--dry_run", "--aggregate")

if __name__ == "__main__":
  if any(a in ("--help", "-h", "--helpfull") for a in sys.argv[1:]):
    print(_USAGE)
    sys.exit(0)
  _flags = {a for a in sys.argv[1:] if a in _FLAGS}
  sys.argv[1:] = [a for a in sys.argv[1:] if a not in _FLAGS]

from realign_jax.plumbing import cli  # noqa: E402
from realign_jax.plumbing import startup  # noqa: E402

cli.precheck(__name__)  # NOTE: before the heavy imports (see cli.py)
if __name__ == "__main__":
  sys.argv[1:] += sorted(_flags)  # NOTE: precheck knows gin arguments only

import dataclasses  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import tokenize  # noqa: E402
from typing import Sequence  # noqa: E402

import gin  # noqa: E402

from realign_jax.plumbing import gin_utils  # noqa: E402
from realign_jax.plumbing.errors import UserError  # noqa: E402
from realign_jax.sweeps import aggregate as aggregate_lib  # noqa: E402
from realign_jax.sweeps import executors  # noqa: E402
from realign_jax.sweeps import plan as plan_lib  # noqa: E402
from realign_jax.sweeps import runner  # noqa: E402

SWEEP_JSON = "sweep.json"


def parse_sweep(argv: Sequence[str]) -> plan_lib.Sweep:
  """The sweep file(s) and overrides, parsed into a `Sweep`."""
  argv, level = startup.strip_verbosity(list(argv))
  if level != startup.verbosity():
    startup.configure(level)
  files, bindings, rest = gin_utils.split_args(argv)
  if rest:
    raise UserError(f"unknown arguments: {' '.join(rest)} (flags: --gin_file, --gin.X=Y, "
                    f"--dry_run, --aggregate)")
  if not files:
    raise UserError("no --gin_file given (a sweep file, e.g. configs/sweeps/ppo_beta_tiny.gin)")
  gin.clear_config()
  for obj, name in ((plan_lib.Sweep, "sweep"), (executors.LocalExecutor, "LocalExecutor"),
                    (executors.SlurmExecutor, "SlurmExecutor")):
    try:
      gin.get_configurable(name)
    except ValueError:
      gin.external_configurable(obj, name)
  for p in (os.getcwd(), gin_utils.REPO_ROOT):
    gin.add_config_file_search_path(p)
  resolved = [gin_utils.resolve_gin_file(f) for f in files]
  try:
    gin.parse_config_files_and_bindings(resolved, list(bindings), finalize_config=False)
    spec = gin.get_configurable("sweep")()
  except (ValueError, KeyError, SyntaxError, TypeError, IOError, tokenize.TokenError) as e:
    raise UserError(f"gin: {gin_utils.first_line(e)}") from e
  finally:
    gin.clear_config()
  if spec.executor is None:
    spec = dataclasses.replace(spec, executor=executors.LocalExecutor(parallel=1))
  if not isinstance(spec.executor, (executors.LocalExecutor, executors.SlurmExecutor)):
    raise UserError(f"sweep.executor = {spec.executor!r}; use @LocalExecutor() or "
                    f"@SlurmExecutor()")
  return spec


def check_bindings(spec: plan_lib.Sweep, runs: Sequence[plan_lib.Run]) -> None:
  """Every binding of every run known to the base config, as its binary would parse it."""
  try:
    module = importlib.import_module(spec.binary)
  except ImportError as e:
    raise UserError(f"sweep.binary = {spec.binary!r} cannot be imported ({e})") from e
  fn_name = spec.binary.rsplit(".", 1)[-1]
  fn = getattr(module, fn_name, None)
  if not callable(fn):
    raise UserError(f"sweep.binary = {spec.binary!r} has no function {fn_name}(); a sweep runs "
                    f"the binaries (realign_jax.train, .decode, .evaluate, the studies)")
  gin_utils.register()
  try:
    gin.get_configurable(fn_name)
  except ValueError:
    gin.external_configurable(fn, fn_name)
  files = [gin_utils.resolve_gin_file(f) for f in spec.gin_files]
  gin.clear_config()
  for p in (os.getcwd(), gin_utils.REPO_ROOT):
    gin.add_config_file_search_path(p)
  try:
    try:
      gin.parse_config_files_and_bindings(files, [], finalize_config=False)
    except (ValueError, KeyError, SyntaxError, TypeError, IOError, tokenize.TokenError) as e:
      raise UserError(f"the base config {', '.join(spec.gin_files)}: gin: "
                      f"{gin_utils.first_line(e)}") from e
    # NOTE: a binding `NAME=...` of a macro the base config lacks would define a new,
    # unused macro: gin accepts it, so macros are looked up first.
    for name in runs[0].bindings:
      if "." not in name:
        try:
          gin.query_parameter(f"%{name}")
        except ValueError:
          raise UserError(f"binding {name} is not a macro of the base config "
                          f"{', '.join(spec.gin_files)} (a typo? macros are bound as NAME = "
                          f"value there)") from None
    for run in runs:
      overrides = [f"{k}={plan_lib.gin_literal(v, k)}" for k, v in run.bindings.items()]
      for line in overrides:
        try:
          gin.parse_config_files_and_bindings([], [line], finalize_config=False)
        except (ValueError, KeyError, SyntaxError, TypeError) as e:
          raise UserError(f"binding {line.split('=', 1)[0]} (run {run.name}): gin: "
                          f"{gin_utils.first_line(e)}") from e
  finally:
    gin.clear_config()


def check_run_dirs(runs: Sequence[plan_lib.Run]) -> None:
  """A run directory made with other bindings (a changed fixed binding) is refused."""
  for run in runs:
    if os.path.exists(run.run_dir) and not os.path.isdir(run.run_dir):
      raise UserError(f"run directory {run.run_dir} exists and is not a directory")
    old = runner.recorded_bindings(run.run_dir)
    if old is not None and old != _jsonable(run.bindings):
      diff = sorted(k for k in set(old) | set(run.bindings)
                    if old.get(k) != _jsonable(run.bindings).get(k))
      raise UserError(f"run directory {run.run_dir} was made with other bindings "
                      f"({', '.join(diff)} differ); use another sweep.root or remove it")


def _jsonable(obj):
  return json.loads(json.dumps(obj))


def plan(argv: Sequence[str]) -> tuple:
  spec = parse_sweep(argv)
  runs = plan_lib.expand(spec)
  return spec, runs


def dry_run(spec, runs) -> None:
  for run in runs:
    state = "done" if runner.is_done(run.run_dir) else "to run"
    print(f"{run.name}\t{state}\t{run.describe()}")


def run_sweep(spec: plan_lib.Sweep, runs: Sequence[plan_lib.Run]) -> int:
  root = plan_lib.root_dir(spec)
  todo = [r for r in runs if not runner.is_done(r.run_dir)]
  os.makedirs(root, exist_ok=True)
  runner.atomic_write_json(os.path.join(root, SWEEP_JSON), {
      "binary": spec.binary, "gin_files": list(spec.gin_files),
      "runs": [{"name": r.name, "bindings": r.bindings} for r in runs]})
  print(f"sweep: {len(runs)} runs under {root}: {len(runs) - len(todo)} finished before, "
        f"{len(todo)} to run ({spec.executor.describe()})", flush=True)
  cwd = os.getcwd()
  jobs = [runner.RunJob(name=r.name, run_dir=r.run_dir, command=r.command, cwd=cwd,
                        max_retries=spec.max_retries, bindings=r.bindings) for r in todo]
  counter = {"n": 0}

  def report(res: runner.RunResult) -> None:
    counter["n"] += 1
    what = (f"done in {res.seconds:.1f} s" if res.status == "done" else
            f"{res.status} (exit {res.exit_code}, {res.attempts} attempt(s)): {res.error}")
    print(f"[{counter['n']}/{len(jobs)}] {res.name}: {what}", flush=True)

  results = spec.executor.run(jobs, report, root) if jobs else []
  failed = [r for r in results if r.status != "done"]
  done_now = sum(r.status == "done" for r in results)
  print(f"summary: {len(runs) - len(todo)} skipped (finished before), {done_now} done now, "
        f"{len(failed)} failed" + (f", {len(jobs) - len(results)} not waited for"
                                   if len(results) < len(jobs) else ""), flush=True)
  for r in failed:
    print(f"failed: {r.name} (exit {r.exit_code}, {r.attempts} attempt(s)): "
          f"{r.error or '(no stderr)'}", flush=True)
  if len(results) == len(jobs) and len(failed) < len(runs):
    print_aggregate(aggregate_lib.aggregate(spec, runs))
  return 1 if failed else 0


def print_aggregate(doc: dict) -> None:
  counted = sum(len(s["runs"]) for s in doc["settings"])
  print(f"aggregate: {len(doc['settings'])} settings from {counted} runs "
        f"({len(doc['missing_runs'])} missing): " + ", ".join(doc["paths"].values()), flush=True)


def main(argv: list) -> int:
  flags = {a for a in argv if a in _FLAGS}
  spec, runs = plan([a for a in argv if a not in _FLAGS])
  if "--aggregate" in flags:
    print_aggregate(aggregate_lib.aggregate(spec, runs))
    return 0
  check_bindings(spec, runs)
  check_run_dirs(runs)
  if "--dry_run" in flags:
    dry_run(spec, runs)
    return 0
  spec.executor.check()
  return run_sweep(spec, runs)


def _on_term(signum, frame):
  del frame
  # NOTE: SIGTERM (a scheduler's or `kill`) ends the live runs as Ctrl-C does.
  raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
  signal.signal(signal.SIGTERM, _on_term)
  gin_utils.run_main(main)
