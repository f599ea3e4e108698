r"""Training binary: every algorithm runs through the one trainer loop.

  python -m realign_jax.train --gin_file=configs/sft/builtin_tiny.gin \
      --gin.MODEL_DIR="'runs/sft'" --gin.TRAIN_STEPS=300

Runs TRAIN_STEPS steps in total, resuming from MODEL_DIR's latest checkpoint;
writes checkpoints, metrics.jsonl, TensorBoard events, model.json and the
operative gin config into MODEL_DIR.
"""

from realign_jax import startup

startup.precheck(__name__)  # NOTE: before the heavy imports (see startup.py)

import os
from typing import Optional

import optax

from realign_jax import gin_utils
from realign_jax.checkpoints import manager as ckpt_lib
from realign_jax.errors import UserError
from realign_jax.parallel import partitioning
from realign_jax.training import trainer as trainer_lib


def train(*, model_dir: str, train_steps: int, algorithm: trainer_lib.Algorithm,
          optimizer: optax.GradientTransformation,
          trainer_config: trainer_lib.TrainerConfig = trainer_lib.TrainerConfig(),
          mesh_data: int = -1, mesh_model: int = 1, fsdp: bool = False,
          ) -> dict:
  """Trains `algorithm` for `train_steps` steps in total in `model_dir`."""
  # NOTE: gin passes values on as written (TRAIN_STEPS='ten', batch_size='8'):
  # their types are checked here, before anything is built or written.
  from realign_jax import config_check
  config_check.check_args(train, dict(
      model_dir=model_dir, train_steps=train_steps, algorithm=algorithm,
      trainer_config=trainer_config, mesh_data=mesh_data, mesh_model=mesh_model, fsdp=fsdp))
  if not model_dir:
    raise UserError("MODEL_DIR is empty")
  ckpt_lib.check_run_dir(model_dir)
  partitioning.maybe_initialize_distributed()
  mesh = partitioning.create_mesh(mesh_data, mesh_model)
  rules = partitioning.logical_axis_rules(fsdp)
  model = getattr(algorithm, "model", None)
  if model is not None:
    path = os.path.join(model_dir, ckpt_lib.MODEL_JSON)
    if os.path.exists(path):
      previous, _ = ckpt_lib.read_model_json(model_dir)
      if previous != model.config:
        raise UserError(f"{path} describes another model than this config ({previous} vs "
                        f"{model.config}); use a fresh MODEL_DIR")
    ckpt_lib.write_model_json(model_dir, model.config, model.output_head)
  result = trainer_lib.train(algorithm=algorithm, model_dir=model_dir, train_steps=train_steps,
                             optimizer=optimizer, mesh=mesh, rules=rules, config=trainer_config)
  gin_utils.write_operative_config(model_dir)
  result["model_dir"] = model_dir
  return result


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
