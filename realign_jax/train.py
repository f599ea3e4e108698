r"""Training binary: every algorithm runs through the one trainer loop.

  python -m realign_jax.train --gin_file=configs/sft/builtin_tiny.gin \
      --gin.MODEL_DIR="'runs/sft'" --gin.TRAIN_STEPS=300

Runs TRAIN_STEPS steps in total, resuming from MODEL_DIR's latest checkpoint;
writes checkpoints, metrics.jsonl, TensorBoard events, model.json, the
bindings the run started with (run_config.gin) and the operative gin config
(config.gin, when training starts and again at the end) into MODEL_DIR
(`checkpoints.run_dir.RunDir`). Nothing is written there until the run is sure
to start: a command refused (a missing INIT_CHECKPOINT, a model of another
size) leaves MODEL_DIR as it was.

On several hosts (see `realign_jax.parallel.multihost`) every process runs
this same command into the same MODEL_DIR: each reads its own shard of the
data, all save the checkpoints together, and process 0 alone writes the other
files and shows progress. A SIGTERM on any host makes every host save at the
same step.
"""

from realign_jax.plumbing import cli

cli.precheck(__name__)  # NOTE: before the heavy imports (see cli.py)

from typing import Callable, Optional, Union

import gin
import optax

from realign_jax.plumbing import config_check
from realign_jax.plumbing import gin_utils
from realign_jax.checkpoints import run_dir
from realign_jax.plumbing.errors import UserError
from realign_jax.parallel import multihost
from realign_jax.parallel import partitioning
from realign_jax.training import optim
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

  The run directory is `run_dir.RunDir`'s: locked while training; what the
  algorithm records (`Algorithm.run_record`: model, vocabulary,
  INIT_CHECKPOINT) is checked before anything is written there. A resume under
  other bindings than the run started with (step count aside) is refused
  unless `allow_config_change` (the change is recorded in the run); a resume,
  or an INIT_CHECKPOINT, with another vocabulary is refused unless
  `allow_vocabulary_mismatch`.
  """
  # NOTE: gin passes values on as written (TRAIN_STEPS='ten', batch_size='8'):
  # their types are checked here, before anything is built or written.
  config_check.check_args(train, dict(
      model_dir=model_dir, train_steps=train_steps, algorithm=algorithm,
      trainer_config=trainer_config, mesh_data=mesh_data, mesh_model=mesh_model, fsdp=fsdp,
      allow_config_change=allow_config_change,
      allow_vocabulary_mismatch=allow_vocabulary_mismatch))
  run = run_dir.RunDir(model_dir)
  optimizer = _built_optimizer(optimizer, algorithm, train_steps)
  multihost.initialize()  # NOTE: a no-op when the binary already did, or on one host
  record = algorithm.run_record()
  mesh = _checked_mesh(record.batch_size, algorithm, mesh_data, mesh_model)
  with run:
    run.check(record, allow_config_change=allow_config_change,
              allow_vocabulary_mismatch=allow_vocabulary_mismatch)
    result = trainer_lib.train(algorithm=algorithm, model_dir=run, train_steps=train_steps,
                               optimizer=optimizer, mesh=mesh,
                               rules=partitioning.logical_axis_rules(fsdp),
                               config=trainer_config)
    run.finish()
  result["model_dir"] = model_dir
  return result


def _checked_mesh(batch_size: Optional[int], algorithm, mesh_data: int, mesh_model: int):
  """The run's mesh, the global batch (and PPO's minibatch) checked to divide over it."""
  name = type(algorithm).__name__
  checked = isinstance(batch_size, int)
  if checked:
    multihost.check_divides(batch_size, f"{name}.batch_size")
  mesh = partitioning.create_mesh(mesh_data, mesh_model)
  if checked:
    partitioning.check_batch_divides(batch_size, mesh, f"{name}.batch_size")
    minibatches = algorithm.num_minibatches
    if isinstance(minibatches, int) and minibatches > 1 and batch_size % minibatches == 0:
      partitioning.check_batch_divides(batch_size // minibatches, mesh,
                                       f"{name}.batch_size / num_minibatches")
  return mesh


def _built_optimizer(optimizer, algorithm, train_steps: int) -> optax.GradientTransformation:
  """`optimizer` itself, or its factory built over the run's optimizer updates."""
  if isinstance(optimizer, optax.GradientTransformation):
    return optimizer
  if not callable(optimizer):
    raise UserError(f"train.optimizer must be an optimizer or a factory such as @make_optimizer, "
                    f"got {type(optimizer).__name__}")
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
