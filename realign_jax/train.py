r"""Training binary: every algorithm runs through the one trainer loop.

  python -m realign_jax.train --gin_file=configs/sft/builtin_tiny.gin \
      --gin.MODEL_DIR="'runs/sft'" --gin.TRAIN_STEPS=300

Runs TRAIN_STEPS steps in total, resuming from MODEL_DIR's latest checkpoint;
writes checkpoints, metrics.jsonl, TensorBoard events, model.json and the
operative gin config (config.gin, when training starts and again at the end)
into MODEL_DIR.

On several hosts (see `realign_jax.parallel.multihost`) every process runs
this same command into the same MODEL_DIR: each reads its own shard of the
data, all save the checkpoints together, and process 0 alone writes the other
files and shows progress. A SIGTERM on any host makes every host save at the
same step.
"""

from realign_jax import cli

cli.precheck(__name__)  # NOTE: before the heavy imports (see cli.py)

import os
from typing import Callable, Optional, Union

import gin
import jax
import optax

from realign_jax import gin_utils
from realign_jax import paths
from realign_jax.checkpoints import manager as ckpt_lib
from realign_jax.checkpoints import run_dir
from realign_jax.errors import UserError
from realign_jax.parallel import multihost
from realign_jax.parallel import partitioning
from realign_jax.training import trainer as trainer_lib


def train(*, model_dir: str, train_steps: int, algorithm: trainer_lib.Algorithm,
          optimizer: Union[optax.GradientTransformation, Callable[..., optax.GradientTransformation]],
          trainer_config: trainer_lib.TrainerConfig = trainer_lib.TrainerConfig(),
          mesh_data: int = -1, mesh_model: int = 1, fsdp: bool = False,
          allow_config_change: bool = False, allow_vocabulary_mismatch: bool = False,
          ) -> dict:
  """Trains `algorithm` for `train_steps` steps in total in `model_dir`.

  `optimizer` is an optax transformation, or (the shipped configs: gin
  `train.optimizer = @make_optimizer`, without parentheses) a factory called
  here with `total_steps` = the run's optimizer updates, TRAIN_STEPS times the
  algorithm's updates per step (PPO: epochs x minibatches), so a schedule
  decays over the whole run.

  The run directory is locked while training (`run_dir.RunLock`); a resume
  under other bindings than the run started with (step count aside) is refused
  unless `allow_config_change` (the change is recorded in the run); the
  vocabulary is recorded in model.json and a resume, or an INIT_CHECKPOINT,
  with another one is refused unless `allow_vocabulary_mismatch`.
  """
  # NOTE: gin passes values on as written (TRAIN_STEPS='ten', batch_size='8'):
  # their types are checked here, before anything is built or written.
  from realign_jax import config_check
  config_check.check_args(train, dict(
      model_dir=model_dir, train_steps=train_steps, algorithm=algorithm,
      trainer_config=trainer_config, mesh_data=mesh_data, mesh_model=mesh_model, fsdp=fsdp,
      allow_config_change=allow_config_change,
      allow_vocabulary_mismatch=allow_vocabulary_mismatch))
  if not model_dir:
    raise UserError("MODEL_DIR is empty")
  optimizer = _built_optimizer(optimizer, algorithm, train_steps)
  ckpt_lib.check_run_dir(model_dir)
  multihost.initialize()  # NOTE: a no-op when the binary already did, or on one host
  batch_size = getattr(algorithm, "batch_size", None)
  if isinstance(batch_size, int):  # NOTE: before anything is written into MODEL_DIR
    multihost.check_divides(batch_size, f"{type(algorithm).__name__}.batch_size")
  mesh = partitioning.create_mesh(mesh_data, mesh_model)
  if isinstance(batch_size, int):
    name = type(algorithm).__name__
    partitioning.check_batch_divides(batch_size, mesh, f"{name}.batch_size")
    minibatches = getattr(algorithm, "num_minibatches", 1)
    if isinstance(minibatches, int) and minibatches > 1 and batch_size % minibatches == 0:
      partitioning.check_batch_divides(batch_size // minibatches, mesh,
                                       f"{name}.batch_size / num_minibatches")
  rules = partitioning.logical_axis_rules(fsdp)
  # NOTE: process 0 speaks for the run: it holds the lock and writes the records.
  lock = run_dir.RunLock(model_dir) if jax.process_index() == 0 else None
  if lock is not None:
    paths.makedirs(model_dir)
    lock.acquire()
  try:
    refused = None
    try:
      _check_and_record(model_dir, algorithm, allow_config_change, allow_vocabulary_mismatch)
      gin_utils.write_operative_config(model_dir)  # NOTE: at the start, so a running job has one
    except UserError as e:
      refused = e
    # NOTE: process 0 alone checks the run's records; the others must not go
    # on into collectives that it will never join.
    if multihost.any_process(refused is not None):
      raise refused or UserError(f"process 0 refused to start the run in {model_dir} "
                                 "(its error line says why)")
    result = trainer_lib.train(algorithm=algorithm, model_dir=model_dir,
                               train_steps=train_steps, optimizer=optimizer, mesh=mesh,
                               rules=rules, config=trainer_config)
    gin_utils.write_operative_config(model_dir)
  finally:
    if lock is not None:
      lock.release()
  result["model_dir"] = model_dir
  return result


def _built_optimizer(optimizer, algorithm, train_steps: int) -> optax.GradientTransformation:
  """`optimizer` itself, or its factory built over the run's optimizer updates."""
  if isinstance(optimizer, optax.GradientTransformation):
    return optimizer
  if not callable(optimizer):
    raise UserError(f"train.optimizer must be an optimizer or a factory such as @make_optimizer, "
                    f"got {type(optimizer).__name__}")
  from realign_jax.training import optim
  updates = optim.optimizer_updates(algorithm, train_steps)
  try:
    bound = gin.query_parameter("make_optimizer.total_steps")
  except ValueError:
    bound = None
  if bound is not None:
    # NOTE: the factory's call below would override it without a word.
    raise UserError(f"make_optimizer.total_steps is bound ({bound}), but with "
                    f"train.optimizer = @make_optimizer the train binary sets it to the run's "
                    f"optimizer updates ({updates}); remove the binding")
  built = optimizer(total_steps=updates)
  if not isinstance(built, optax.GradientTransformation):
    raise UserError(f"train.optimizer's factory returned {type(built).__name__}, not an "
                    f"optax optimizer")
  return built


def _check_and_record(model_dir: str, algorithm, allow_config_change: bool,
                      allow_vocabulary_mismatch: bool) -> None:
  """model.json (model and vocabulary) and the run's recorded config, checked then written."""
  vocab_path = getattr(algorithm, "vocab_path", None)
  vocab = run_dir.vocabulary_identity(vocab_path)
  init = getattr(algorithm, "init_checkpoint", None)
  if isinstance(init, str) and init:
    run_dir.check_vocabulary(init, run_dir.recorded_vocabulary(init), vocab_path,
                             allow_other=allow_vocabulary_mismatch, where="INIT_CHECKPOINT")
  model = getattr(algorithm, "model", None)
  if model is not None:
    path = os.path.join(model_dir, ckpt_lib.MODEL_JSON)
    if paths.exists(path):
      previous, _ = ckpt_lib.read_model_json(model_dir)
      if previous != model.config:
        raise UserError(f"{path} describes another model than this config ({previous} vs "
                        f"{model.config}); use a fresh MODEL_DIR")
      run_dir.check_vocabulary(model_dir, run_dir.recorded_vocabulary(model_dir), vocab_path,
                               allow_other=allow_vocabulary_mismatch, where="resume")
  if jax.process_index() != 0:
    return
  steps = [int(d) for d in _listdir(os.path.join(model_dir, ckpt_lib.CHECKPOINT_SUBDIR))
           if d.isdigit()]
  config_text = gin.config_str()
  if config_text.strip():
    run_dir.check_resume_config(model_dir, config_text, step=max(steps, default=0),
                                allow_change=allow_config_change)
  if model is not None:
    ckpt_lib.write_model_json(model_dir, model.config, model.output_head, vocab=vocab)


def _listdir(path: str) -> list:
  return paths.listdir(path) if paths.isdir(path) else []


def main(argv: list) -> int:
  result = gin_utils.call(gin_utils.configure_binary(argv, "train", train))
  print(f"done: step {result['step']}; train {_fmt(result['train'])}; "
        f"eval {_fmt(result['eval'])}; run directory {result['model_dir']}")
  return 0


def _fmt(row: Optional[dict]) -> str:
  if not row:
    return "-"
  keys = [k for k in ("loss", "tokens_per_sec") if k in row]
  return ", ".join(f"{k}={row[k]:.4g}" for k in keys)


if __name__ == "__main__":
  gin_utils.run_main(main)
