"""Optimizers and schedules (optax): Adafactor is the T5 default, AdamW an option."""

import jax.numpy as jnp
import optax

from realign_jax.plumbing import config_check
from realign_jax.plumbing.errors import UserError

SCHEDULES = ("constant", "rsqrt", "cosine", "linear")
OPTIMIZERS = ("adafactor", "adamw", "adam", "sgd")


def make_schedule(learning_rate: float, schedule: str = "constant", warmup_steps: int = 0,
                  total_steps: int = 0) -> optax.Schedule:
  """Linear warmup then `schedule`; rsqrt is T5's lr / sqrt(max(step, warmup))."""
  if schedule not in SCHEDULES:
    raise UserError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")
  warm = max(int(warmup_steps), 0)
  if schedule == "rsqrt":
    # T5: constant for `warmup_steps`, then lr * sqrt(warmup / step).
    w = float(max(warm, 1))
    return lambda step: learning_rate * jnp.sqrt(w / jnp.maximum(step + 1.0, w))
  if schedule == "constant":
    after = optax.constant_schedule(learning_rate)
  elif schedule == "cosine":
    after = optax.cosine_decay_schedule(learning_rate, max(total_steps - warm, 1))
  else:
    after = optax.linear_schedule(learning_rate, 0.0, max(total_steps - warm, 1))
  if warm == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warm), after], [warm])


def make_optimizer(*, name: str = "adafactor", learning_rate: float = 1e-3,
                   schedule: str = "constant", warmup_steps: int = 0, total_steps: int = 0,
                   weight_decay: float = 0.0, grad_clip_norm: float = 1.0, b1: float = 0.9,
                   b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
  """Gradient clipping by global norm, then the optimizer with its schedule."""
  # NOTE: gin passes values on as written (total_steps = %TRAIN_STEPS = 'ten').
  config_check.check_args(make_optimizer, dict(locals()))
  if name not in OPTIMIZERS:
    raise UserError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")
  lr = make_schedule(learning_rate, schedule, warmup_steps, total_steps)
  if name == "adafactor":
    opt = optax.adafactor(learning_rate=lr, multiply_by_parameter_scale=False,
                          weight_decay_rate=weight_decay or None, clipping_threshold=None)
  elif name == "adamw":
    opt = optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
  elif name == "adam":
    opt = optax.adam(lr, b1=b1, b2=b2, eps=eps)
  else:
    opt = optax.sgd(lr)
  if grad_clip_norm and grad_clip_norm > 0:
    opt = optax.chain(optax.clip_by_global_norm(grad_clip_norm), opt)
  return opt


def optimizer_updates(algorithm, steps: int) -> int:
  """Optimizer updates in `steps` train steps: PPO makes epochs x minibatches per step.

  NOTE: a schedule counts optimizer updates, not train steps; built over
  `steps` alone, PPO's cosine or linear decay reached 0 a quarter of the way
  in (2 x 2 updates a step) and the rest of the run changed nothing.
  """
  return int(steps) * int(getattr(algorithm, "num_epochs", 1)) * int(
      getattr(algorithm, "num_minibatches", 1))
