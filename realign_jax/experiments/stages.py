"""Stage machinery of the studies: each stage in its own directory, cached, resumable.

A study is a sequence of named stages (train SFT, train PPO at some beta,
decode a sweep, ...). Stage `name` works in `ROOT/name/` and, when it has
finished, writes `ROOT/name/stage.json`:

  {"name", "settings", "result", "files", "seconds", "cpu_seconds"}

A rerun of the study skips a stage whose stage.json is intact, whose
settings equal the ones asked for now, and whose listed output files all
exist; it returns the cached `result`. A stage without an intact stage.json
(killed half-way, or its marker corrupted) or with an output file missing is
run again; its function resumes what it can (the trainer restarts from the
stage directory's latest checkpoint). A finished stage whose settings differ
from the ones asked for is an error: its outputs belong to another
configuration, and silently mixing the two would corrupt the study.

On several processes (jax.distributed) every process runs every stage (they
join the same collectives) and process 0 alone writes: it decides whether a
stage is cached and sends its stage.json to the others, so no process runs a
stage that another skips (that would deadlock), and all get process 0's
result. ROOT may be an object-store URI (gs://...): files go through
`realign_jax.plumbing.paths`.
"""

import dataclasses
import json
import logging
import math
import os
import time
from typing import Any, Callable, Optional

from realign_jax.plumbing import paths
from realign_jax.checkpoints.manager import atomic_write_jsonl, atomic_write_text
from realign_jax.plumbing.errors import UserError
from realign_jax.parallel import multihost

STAGE_JSON = "stage.json"


# The metadata key of a settings field recorded only when it is not at its default.
NEW_FIELD = "recorded_if_not_default"


def canonical(value: Any) -> Any:
  """A JSON-comparable form of settings: dataclasses as dicts, tuples as lists, floats kept."""
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    out = {"__type__": type(value).__name__}
    for f in dataclasses.fields(value):
      if f.name.startswith("_"):
        continue
      v = getattr(value, f.name)
      # NOTE: a field added after stages were cached is recorded only away from
      # its default, so the records written before it still match.
      if f.metadata.get(NEW_FIELD) and v == f.default:
        continue
      out[f.name] = canonical(v)
    return out
  if isinstance(value, dict):
    return {str(k): canonical(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [canonical(v) for v in value]
  if isinstance(value, float) and not math.isfinite(value):
    return repr(value)
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  return repr(value)


def _first_difference(a: Any, b: Any, path: str = "") -> Optional[str]:
  if isinstance(a, dict) and isinstance(b, dict):
    for k in sorted(set(a) | set(b)):
      if k not in a or k not in b:
        return f"{path}.{k}".lstrip(".")
      d = _first_difference(a[k], b[k], f"{path}.{k}")
      if d:
        return d
    return None
  if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
    for i, (x, y) in enumerate(zip(a, b)):
      d = _first_difference(x, y, f"{path}[{i}]")
      if d:
        return d
    return None
  return None if a == b else (path.lstrip(".") or "(settings)")


def is_primary() -> bool:
  """Whether this process writes the study's files (process 0)."""
  return multihost.is_primary()


def on_primary(fn: Callable[[], Any]) -> Any:
  """fn() on process 0, its JSON-serialisable value on every process.

  An error on process 0 is raised there and, as a one-line UserError with
  its message, on the others (rather than leaving them waiting forever).
  A collective: every process calls it, in the same order.
  """
  value, error = None, None
  if multihost.is_primary():
    try:
      value = fn()
    except Exception as e:  # pylint: disable=broad-except
      error = e
  payload = multihost.broadcast_object(
      {"value": value} if error is None else {"error": str(error).splitlines()[0] if str(error)
                                                else type(error).__name__})
  if error is not None:
    raise error
  if "error" in payload:
    raise UserError(payload["error"])
  return payload["value"]


class StageRunner:
  """Runs a study's stages under `root`, skipping the finished ones."""

  def __init__(self, root: str, total: Optional[int] = None, log: Callable[[str], None] = print):
    if not root:
      raise UserError("MODEL_DIR is empty")
    self.root = root
    self.total = total
    self.log = log
    self.index = 0
    self.timings = {}  # name -> seconds (of the run that produced the stage)
    self.cpu_timings = {}  # name -> CPU seconds of this process, all threads
    self.ran = []  # names of the stages run (not cached) in this invocation
    if is_primary():
      paths.makedirs(root)

  def stage_dir(self, name: str) -> str:
    return os.path.join(self.root, name)

  def _read(self, name: str) -> Optional[dict]:
    """The intact stage.json of `name`, or None (absent, corrupted or incomplete)."""
    path = os.path.join(self.stage_dir(name), STAGE_JSON)
    if not paths.exists(path):
      return None
    try:
      doc = json.loads(paths.read_text(path))
    except (OSError, ValueError) as e:
      logging.warning("stage %s: %s is unreadable (%s); running the stage again", name, path, e)
      return None
    if not (isinstance(doc, dict) and doc.get("name") == name and "settings" in doc
            and "result" in doc and isinstance(doc.get("files", []), list)):
      logging.warning("stage %s: %s is incomplete; running the stage again", name, path)
      return None
    missing = [f for f in doc.get("files", [])
               if not paths.exists(os.path.join(self.stage_dir(name), f))]
    if missing:
      logging.warning("stage %s: output %s is missing; running the stage again", name, missing[0])
      return None
    return doc

  def is_done(self, name: str, settings: Any) -> bool:
    doc = on_primary(lambda: self._read(name))
    return doc is not None and doc["settings"] == canonical(settings)

  def run(self, name: str, settings: Any, fn: Callable[[str], dict], *,
          files: Callable[[dict], list] = lambda result: []) -> dict:
    """Runs stage `name` (or returns its cached result).

    Args:
      name: the stage's directory name under the root.
      settings: everything the stage's outputs depend on (compared on reruns).
      fn: fn(stage_dir) -> a JSON-serialisable result dict; must resume or
        overwrite whatever a killed earlier attempt left in stage_dir. On
        several processes it runs on each; only process 0 may write files.
      files: result -> the output files (relative to stage_dir) that must
        exist for the cached stage to count as finished.

    Returns:
      The stage's result (process 0's, on every process).
    """
    self.index += 1
    count = f"[{self.index}/{self.total}]" if self.total else f"[{self.index}]"
    settings = canonical(settings)
    # NOTE: process 0 decides and the others follow: a stage run by some
    # processes and skipped by others would hang in its first collective.
    doc = on_primary(lambda: self._read(name))
    if doc is not None:
      if doc["settings"] != settings:
        diff = _first_difference(doc["settings"], settings)
        raise UserError(
            f"stage {name} in {self.root} was run with other settings ({diff}: "
            f"{_at(doc['settings'], diff)!r} then, {_at(settings, diff)!r} now); use a fresh "
            f"MODEL_DIR or delete {self.stage_dir(name)}")
      self.timings[name] = float(doc.get("seconds", math.nan))
      self.cpu_timings[name] = float(doc.get("cpu_seconds", math.nan))
      self._log(f"{count} {name}: finished earlier, cached ({self.stage_dir(name)})")
      return doc["result"]
    self._log(f"{count} {name}: running in {self.stage_dir(name)}")
    if is_primary():
      paths.makedirs(self.stage_dir(name))
    t0, c0 = time.perf_counter(), time.process_time()
    result = fn(self.stage_dir(name))
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    doc = {"name": name, "settings": settings, "result": result,
           "files": list(files(result)), "seconds": seconds, "cpu_seconds": cpu}

    def write():
      atomic_write_text(os.path.join(self.stage_dir(name), STAGE_JSON),
                        json.dumps(doc, indent=1))
      return doc
    # NOTE: also the barrier after which every process may read the stage's outputs.
    written = on_primary(write)
    if not is_primary():
      doc = written
    self.timings[name] = float(doc["seconds"])
    self.cpu_timings[name] = float(doc["cpu_seconds"])
    self.ran.append(name)
    self._log(f"{count} {name}: done in {doc['seconds']:.0f} s")
    return doc["result"]

  def train(self, name: str, settings: Any, algorithm, steps: int, optimizer: "OptimizerSpec",
            trainer_config) -> dict:
    """Stage `name` trains `algorithm` (`train_stage`), recording `settings` (often
    `train_settings` of the same, with stage paths written as layout)."""
    return self.run(name, settings, lambda d: train_stage(d, algorithm, steps, optimizer,
                                                          trainer_config))

  def _log(self, line: str) -> None:
    if is_primary():  # NOTE: one progress line per stage, not one per process
      self.log(line)

  def reset(self, name: str) -> None:
    """Deletes a stage's directory (its outputs and checkpoints)."""
    on_primary(lambda: paths.rmtree(self.stage_dir(name), ignore_errors=True))


def _at(tree: Any, path: Optional[str]) -> Any:
  """The value at a dotted path from `_first_difference` (best effort, for messages)."""
  if not path or path == "(settings)":
    return tree
  node = tree
  for part in path.replace("[", ".[").split("."):
    if not part:
      continue
    try:
      node = node[int(part[1:-1])] if part.startswith("[") else node[part]
    except (KeyError, IndexError, TypeError, ValueError):
      return "<absent>"
  return node


def layout_free(settings: Any, root: str) -> Any:
  """Canonical settings with paths inside `root` (MODEL_DIR) written relative to it.

  NOTE: stage outputs depend on which stage a path points to, not on where
  MODEL_DIR lives; a moved study directory still resumes.
  """
  settings = canonical(settings)
  if isinstance(settings, dict):
    return {k: layout_free(v, root) for k, v in settings.items()}
  if isinstance(settings, list):
    return [layout_free(v, root) for v in settings]
  if isinstance(settings, str) and paths.is_remote(root):
    # NOTE: a URI is absolute already; os.path.abspath would make it a local path.
    prefix = root.rstrip("/") + "/"
    return "<MODEL_DIR>/" + settings[len(prefix):] if settings.startswith(prefix) else settings
  prefix = os.path.abspath(root) + os.sep
  if isinstance(settings, str) and not paths.is_remote(settings) and \
      os.path.abspath(settings).startswith(prefix) and os.path.isabs(settings):
    return "<MODEL_DIR>/" + os.path.relpath(settings, root)
  return settings


def write_jsonl(path: str, rows: list) -> None:
  """Writes rows as JSON lines atomically (the file appears only when complete).

  Process 0 alone writes (every process computed the same rows); the others
  may read the file once the stage has finished (`StageRunner.run`).
  """
  if is_primary():
    atomic_write_jsonl(path, rows)


def read_jsonl(path: str) -> list:
  with paths.open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


# ---- training stages ------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
  """The optimizer of a training stage (`training.optim.make_optimizer`'s arguments).

  The studies train several runs of different lengths from one spec, so the
  schedule's total steps come from the stage, not from the config.
  """

  name: str = "adamw"
  learning_rate: float = 1e-3
  schedule: str = "constant"
  warmup_steps: int = 0
  weight_decay: float = 0.0
  grad_clip_norm: float = 1.0
  eps: float = dataclasses.field(default=1e-8, metadata={NEW_FIELD: True})  # Adam's epsilon

  def build(self, total_steps: int):
    from realign_jax.training import optim  # NOTE: lazy: optax
    return optim.make_optimizer(name=self.name, learning_rate=self.learning_rate,
                                schedule=self.schedule, warmup_steps=self.warmup_steps,
                                total_steps=total_steps, weight_decay=self.weight_decay,
                                grad_clip_norm=self.grad_clip_norm, eps=self.eps)


def train_settings(algorithm, steps: int, optimizer: OptimizerSpec, trainer_config) -> dict:
  """What a training stage's checkpoints depend on (progress display excluded)."""
  return {"algorithm": algorithm, "steps": int(steps), "optimizer": optimizer,
          "trainer": dataclasses.replace(trainer_config, progress=True)}


def optimizer_updates(algorithm, steps: int) -> int:
  """`training.optim.optimizer_updates` (the schedule's length in updates)."""
  from realign_jax.training import optim  # NOTE: lazy: optax
  return optim.optimizer_updates(algorithm, steps)


def train_stage(run_dir: str, algorithm, steps: int, optimizer: OptimizerSpec,
                trainer_config) -> dict:
  """Trains `algorithm` in `run_dir` through the train binary's function (resumes there).

  With `trainer_config.stop_window` the run may stop before `steps` (the cap)
  once converged. Returns {"step", "last_train", "converged", "evals"}: the
  step reached, whether the stopping rule ended the run, and every eval row
  (the training curve on held-out prompts).
  """
  # NOTE: lazy: the train binary brings Flax and the algorithms; only a training stage needs it.
  from realign_jax import train as train_bin
  result = train_bin.train(model_dir=run_dir, train_steps=steps, algorithm=algorithm,
                           optimizer=optimizer.build(optimizer_updates(algorithm, steps)),
                           trainer_config=trainer_config)
  stopped = bool(result.get("converged"))
  if result["step"] != steps and not stopped:
    raise UserError(f"training in {run_dir} stopped at step {result['step']} of {steps}")
  last = {k: float(v) for k, v in (result.get("train") or {}).items()
          if isinstance(v, (int, float)) or getattr(v, "ndim", None) == 0}
  evals = [{k: v for k, v in row.items() if isinstance(v, (int, float)) and not
            isinstance(v, bool)} for row in result.get("evals") or []]
  return {"step": int(result["step"]), "last_train": last, "converged": stopped,
          "evals": evals}


def compilation_cache_dir(model_dir: str) -> str:
  """Where a study keeps its compilation cache: MODEL_DIR/jax_cache, or a local one.

  NOTE: the cache stays on local disk: for a remote MODEL_DIR (gs://...) it
  goes under the local temp dir (per study path), since every compile would
  otherwise read and write the bucket.
  """
  if not paths.is_remote(model_dir):
    return os.path.join(model_dir, "jax_cache")
  import hashlib
  import tempfile
  key = hashlib.sha256(model_dir.encode("utf-8")).hexdigest()[:16]
  return os.path.join(tempfile.gettempdir(), "realign_jax_cache", key)


def enable_compilation_cache(directory: str) -> None:
  """Persists compiled XLA programs under `directory` (a local path).

  NOTE: a study trains several PPO runs whose train steps are the same
  program (beta lives in the checkpointed aux state, not in the code), and a
  rerun compiles everything again; the persistent cache turns those
  recompilations into reads. A cache the environment already names
  (JAX_COMPILATION_CACHE_DIR, e.g. the test suite's one cache) is kept.
  """
  import jax
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return
  os.makedirs(directory, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
