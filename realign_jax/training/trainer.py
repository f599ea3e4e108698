"""The one trainer loop. Every algorithm (SFT, reward model, PPO, PG, DPO/IPO,
value functions) plugs in through `Algorithm`; none has a loop of its own.

The train step is `jax.jit`-compiled with explicit in/out shardings over a
`Mesh` built from logical axis rules; the state is donated. Checkpoints go
through `realign_jax.checkpoints.manager` (save every N steps and at the end,
keep K, resume from the latest automatically, save on SIGTERM: on several
hosts a SIGTERM on any of them makes all save the same step). Process 0 alone
writes metrics, samples and TensorBoard events and shows progress. A
non-finite loss, gradient norm or updated state stops the run naming the
step, before anything of it is saved: every checkpoint is finite.
"""

import abc
import dataclasses
import logging
import math
import signal
import time
from typing import Any, Iterator, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from realign_jax.plumbing import config_check
from realign_jax.checkpoints import manager as ckpt_lib
from realign_jax.checkpoints import run_dir
from realign_jax.plumbing.errors import Preempted, UserError
from realign_jax.models import api as model_api
from realign_jax.parallel import multihost
from realign_jax.parallel import optimizer_state
from realign_jax.parallel import partitioning
from realign_jax.training.metrics import MetricsWriter

Batch = dict


class Algorithm(abc.ABC):
  """What an algorithm contributes to the trainer loop.

  One train step is: `prepare` (jitted; RL rollouts and frozen-model scoring
  go here) on the whole batch, then `num_epochs` passes over it, each split
  into `num_minibatches` shuffled minibatches with one optimizer update per
  minibatch (PPO's inner loop; 1 x 1 for everything else), then `update_aux`.

  State beyond the trainable params lives in `aux` (a pytree of arrays, e.g.
  an adaptive KL coefficient or a target network): it is part of the train
  state, checkpointed and restored with it. Frozen models (a reference
  policy, a reward model) come from `frozen()` and are passed to the step as
  arguments (never closed over as constants, never donated, never updated).
  """

  name: str = "algorithm"
  num_epochs: int = 1
  num_minibatches: int = 1

  @abc.abstractmethod
  def init(self, rng) -> tuple[Any, Any]:
    """(trainable params, logical PartitionSpecs); traceable (runs inside jit)."""

  def abstract_init(self) -> tuple[Any, Any]:
    """(params as ShapeDtypeStructs, logical axes) without allocating anything."""
    return model_api.abstract_init(self.init)

  def init_aux(self, params) -> Any:
    """Initial auxiliary state from the initial params (traceable); default none."""
    del params
    return {}

  def setup(self, mesh, rules) -> None:
    """Host-side preparation before the first step (load frozen models, data)."""

  def frozen(self) -> Any:
    """Frozen params passed to every step (already placed on the mesh); default none."""
    return None

  def initial_params(self, abstract_params) -> Optional[Any]:
    """Params to start from (e.g. INIT_CHECKPOINT) when no checkpoint exists; None = init."""
    return None

  @abc.abstractmethod
  def batches(self, start_step: int) -> Iterator[Batch]:
    """Host batches (dicts of numpy arrays) for steps start_step, start_step+1, ..."""

  def prepare(self, params, batch: Batch, rng, aux=None, frozen=None) -> tuple[Batch, dict]:
    """Jitted per-step transform before the updates: (batch for the loss, metrics).

    Every leaf of the returned batch must have the batch size as its leading
    dimension (minibatches are taken along it).
    """
    del params, rng, aux, frozen
    return batch, {}

  @abc.abstractmethod
  def loss(self, params, batch: Batch, rng, aux=None, frozen=None) -> tuple[jax.Array, dict]:
    """(scalar loss, dict of scalar metrics); traced inside the train step."""

  def update_aux(self, aux, params, metrics: dict, step) -> Any:
    """Auxiliary state after the step's updates (traceable); default unchanged."""
    del params, metrics, step
    return aux

  def check_step(self, metrics: dict, step: int) -> None:
    """Host-side check of step `step`'s metrics; raise UserError to stop the run.

    Runs before the non-finite-loss check and before anything of the step is
    saved (e.g. RL: a reward that returned NaN, named with its step).
    """
    del metrics, step

  def evaluate(self, params, step: int, aux=None) -> tuple[dict, list]:
    """(eval metrics, decoded samples) on the host; default none.

    `aux` is the current auxiliary state (e.g. RL's adaptive beta).
    """
    del params, step, aux
    return {}, []

  def run_record(self) -> run_dir.RunRecord:
    """What the run directory records of this algorithm and checks before the start:
    its model, vocabulary, INIT_CHECKPOINT and batch size (`run_dir.RunRecord`).

    Default: nothing (no model.json).
    """
    return run_dir.RunRecord()

  def num_tokens(self, batch: Batch) -> int:
    return int(sum(np.sum(np.asarray(v) != 0) for k, v in batch.items()
                   if k in ("inputs", "targets")))


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
  """The loop's settings.

  Convergence (`stop_window` > 0, with `eval_every` > 0): after every eval,
  the run stops (saving that step) once none of the last `stop_window` evals
  has improved `stop_metric` by more than its standard error
  (`stop_metric + "_se"`, from the same eval) over the best value before them;
  `train_steps` is then the cap. See `converged`.
  """

  checkpoint_every: int = 100
  keep_checkpoints: int = 3
  eval_every: int = 100
  log_every: int = 10
  seed: int = 0
  async_checkpoint: bool = True
  progress: bool = True
  stop_window: int = 0
  stop_metric: str = "regularised"


def converged(evals: list, window: int, metric: str = "regularised") -> bool:
  """The stopping rule of `TrainerConfig.stop_window` on the eval rows so far.

  evals: eval metric dicts in step order (the first at step 0 when the run
  evaluated its start). True when there are more than `window` of them and
  max(last `window` values) <= best earlier value + that earlier eval's
  standard error (NaN or missing standard error: 0).
  """
  vals = [(float(e[metric]), float(e.get(metric + "_se", 0.0))) for e in evals
          if metric in e]
  if window < 1 or len(vals) <= window:
    return False
  before, recent = vals[:-window], vals[-window:]
  best, best_se = max(before, key=lambda v: v[0])
  best_se = best_se if math.isfinite(best_se) else 0.0
  return max(v for v, _ in recent) <= best + best_se


class _SigtermFlag:
  def __init__(self):
    self.set = False
    self._old = None

  def __enter__(self):
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread
      self._old = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.set = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def _device_batch(batch: Batch, mesh) -> Batch:
  sharding = partitioning.batch_sharding(mesh)

  def put(x):
    x = np.asarray(x)
    if x.ndim == 0:
      return jax.device_put(x, partitioning.replicated(mesh))
    return jax.make_array_from_process_local_data(sharding, x)
  return jax.tree_util.tree_map(put, batch)


def _all_finite(tree) -> jax.Array:
  """Whether every floating-point leaf of `tree` is finite (traceable; a scalar bool)."""
  flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
           if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(flags)) if flags else jnp.array(True)


def _health_problem(health: dict) -> Optional[str]:
  """What went non-finite in a step, from `train_step`'s health flags (host values), or None."""
  grad_norm = float(health["grad_norm"])
  if not math.isfinite(grad_norm):
    return f"the gradient norm became {grad_norm}"
  for key, what in (("params", "the parameters"), ("opt_state", "the optimizer state"),
                    ("aux", "the auxiliary state")):
    if not bool(health[key]):
      return f"{what} became non-finite"
  return None


def train(*, algorithm: Algorithm, model_dir: Union[str, run_dir.RunDir],
          train_steps: int, optimizer: optax.GradientTransformation, mesh=None, rules=None,
          config: TrainerConfig = TrainerConfig(),
          learning_rate_fn=None) -> dict:
  """Runs `train_steps` steps in total, resuming from MODEL_DIR's latest checkpoint.

  `model_dir`: a path, or the train binary's checked `run_dir.RunDir`. Nothing
  is written there until the run is sure to start: the algorithm is set up,
  the state built (resumed, or INIT_CHECKPOINT loaded) and the first batch
  drawn; then `RunDir.start` records the run and makes `checkpoints/`.

  Returns the last logged train metrics and eval metrics, the step reached,
  "evals" (every eval row of the run, resumed ones included) and "converged"
  (whether `config.stop_window`'s rule stopped it; False when it is off).
  """
  config_check.check_value("TRAIN_STEPS (train_steps)", train_steps, int)
  if train_steps < 0:
    raise UserError(f"TRAIN_STEPS must be >= 0, got {train_steps}")
  if config.stop_window < 0 or (config.stop_window and not config.eval_every):
    raise UserError(f"TrainerConfig.stop_window must be >= 0 and needs eval_every > 0, got "
                    f"stop_window={config.stop_window}, eval_every={config.eval_every}")
  config_check.check_config(algorithm)
  config_check.check_config(config)
  mesh = mesh or partitioning.create_mesh()
  rules = rules or partitioning.logical_axis_rules()
  run = model_dir if isinstance(model_dir, run_dir.RunDir) else run_dir.RunDir(model_dir)
  model_dir = run.path
  ckpt = ckpt_lib.Checkpointer(model_dir, keep=config.keep_checkpoints,
                               async_save=config.async_checkpoint)
  base_rng = jax.random.PRNGKey(config.seed)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    algorithm.setup(mesh, rules)
    abstract_params, axes = algorithm.abstract_init()
    param_sh = partitioning.logical_to_mesh_sharding(axes, mesh, rules)

    def state_from_params(params):
      params = jax.lax.with_sharding_constraint(params, param_sh)
      # NOTE: laid out like the params (sharded under FSDP); left to propagation
      # it came out replicated. The compiled init's output shardings carry it.
      opt_state = optimizer.init(params)
      opt_state = jax.lax.with_sharding_constraint(
          opt_state, optimizer_state.shardings(opt_state, params, axes, mesh, rules))
      return {"step": jnp.zeros((), jnp.int32), "params": params,
              "opt_state": opt_state, "aux": algorithm.init_aux(params)}

    def init_state(rng):
      return state_from_params(algorithm.init(rng)[0])

    init_rng = jax.random.fold_in(base_rng, 0x5eed)
    init_jit = jax.jit(init_state)
    state_sh = init_jit.lower(init_rng).compile().output_shardings
    abstract_state = jax.tree_util.tree_map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        jax.eval_shape(init_state, init_rng), state_sh)

    # NOTE: a step that cannot be read or is not finite is skipped (and set
    # aside, one line on stderr): the run resumes from the newest intact one.
    state, start = ckpt.restore_latest_intact(abstract_state)
    if start is not None:
      logging.info("resumed from %s at step %d", ckpt.directory, start)
    else:
      start = 0
      abstract_p = jax.tree_util.tree_map(
          lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
          abstract_params, param_sh)
      init_params = algorithm.initial_params(abstract_p)
      if init_params is None:
        state = init_jit(init_rng)
      else:
        state = jax.jit(state_from_params, out_shardings=state_sh)(init_params)

    batch_sh = partitioning.batch_sharding(mesh)

    epochs, n_mb = int(algorithm.num_epochs), int(algorithm.num_minibatches)
    if epochs < 1 or n_mb < 1:
      raise UserError(f"num_epochs and num_minibatches must be >= 1, got {epochs} and {n_mb}")

    def update(params, opt_state, minibatch, rng, aux, frozen):
      (loss, metrics), grads = jax.value_and_grad(
          lambda p: algorithm.loss(p, minibatch, rng, aux=aux, frozen=frozen),
          has_aux=True)(params)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
      return params, opt_state, dict(metrics, loss=loss, grad_norm=optax.global_norm(grads))

    def train_step(state, batch, rng, frozen):
      prep_rng, loss_rng = jax.random.split(rng)
      aux = state["aux"]
      batch, prep_metrics = algorithm.prepare(state["params"], batch, prep_rng, aux=aux,
                                              frozen=frozen)
      if epochs == 1 and n_mb == 1:
        params, opt_state, metrics = update(state["params"], state["opt_state"], batch,
                                            loss_rng, aux, frozen)
      else:
        b = jax.tree_util.tree_leaves(batch)[0].shape[0]
        if b % n_mb:
          raise UserError(f"batch size {b} is not divisible by num_minibatches {n_mb}")

        def one_epoch(carry, epoch_rng):
          perm_rng, upd_rng = jax.random.split(epoch_rng)
          perm = jax.random.permutation(perm_rng, b)
          mbs = jax.tree_util.tree_map(
              lambda x: x[perm].reshape((n_mb, b // n_mb) + x.shape[1:]), batch)

          def one_update(carry, xs):
            mb, r = xs
            p, o, m = update(carry[0], carry[1], mb, r, aux, frozen)
            return (p, o), m
          return jax.lax.scan(one_update, carry, (mbs, jax.random.split(upd_rng, n_mb)))

        (params, opt_state), per_update = jax.lax.scan(
            one_epoch, (state["params"], state["opt_state"]),
            jax.random.split(loss_rng, epochs))
        # NOTE: the first update's metrics are kept apart (`first/...`): there
        # the policy still equals the rollout policy (PPO's ratio is exactly 1).
        metrics = {k: jnp.mean(v) for k, v in per_update.items()}
        metrics.update({f"first/{k}": v[0, 0] for k, v in per_update.items()})
      metrics = dict(prep_metrics, **metrics)
      if learning_rate_fn is not None:
        metrics["learning_rate"] = learning_rate_fn(state["step"])
      new_aux = algorithm.update_aux(aux, params, metrics, state["step"] + 1)
      new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state,
                   "aux": new_aux}
      # NOTE: the loss is of the params before the update: a NaN gradient makes
      # the new params NaN while it is finite. These flags are reduced here, on
      # device, so the host fetches four scalars a step, not the params.
      grad_norm = (metrics["grad_norm"] if epochs == 1 and n_mb == 1
                   else jnp.max(per_update["grad_norm"]))
      health = {"grad_norm": grad_norm, "params": _all_finite(params),
                "opt_state": _all_finite(opt_state), "aux": _all_finite(new_aux)}
      return new_state, metrics, health

    frozen = algorithm.frozen()
    step_jit = jax.jit(train_step, in_shardings=(state_sh, batch_sh, None, None),
                       out_shardings=(state_sh, None, None), donate_argnums=(0,))
    batches = algorithm.batches(start)
    # NOTE: drawn before the run is recorded, so that an error in the inputs (a
    # missing data directory) leaves MODEL_DIR as it was, like every error above.
    first_batch = next(batches) if start < train_steps else None
    run.start()

    primary = jax.process_index() == 0
    writer = MetricsWriter(model_dir, resume_step=start if start else None, enabled=primary)
    last_train, last_eval = {}, {}
    bar = None
    step_fn = None
    last_saved = start if start else None
    step = start
    # NOTE: a resumed run's earlier evals come from its metrics file (the writer
    # has dropped the rows after the resumed step), so the stopping rule sees them.
    evals = writer.read_rows("eval") if start else []
    # NOTE: decided with every process: only process 0 need see the metrics
    # file (hosts without a shared disk), and a host that left the loop alone
    # would leave the others waiting in a collective.
    stopped = multihost.any_process(bool(
        config.stop_window and start and converged(evals, config.stop_window,
                                                   config.stop_metric)))
    try:
      # NOTE: inside the try, so a failing first eval still closes the bar,
      # the checkpointer and the writer.
      if config.eval_every and start == 0 and train_steps > 0:
        ev, _ = algorithm.evaluate(state["params"], 0, aux=state["aux"])  # the starting point
        if ev:
          last_eval = writer.write(0, ev, "eval")
          evals.append(last_eval)
      tokens, t0 = 0, time.perf_counter()
      with _SigtermFlag() as sigterm:
        while step < train_steps and not stopped:
          host_batch = next(batches) if first_batch is None else first_batch
          first_batch = None
          if bar is None and config.progress and primary:
            # NOTE: drawn once the data has produced a batch, so an error in
            # the inputs (a missing data directory) is the only line shown.
            from tqdm import tqdm
            bar = tqdm(total=train_steps, initial=min(start, train_steps), desc=algorithm.name,
                       unit="step", dynamic_ncols=True, mininterval=1.0)
          tokens += algorithm.num_tokens(host_batch)
          batch = _device_batch(host_batch, mesh)
          step_rng = jax.random.fold_in(base_rng, step)
          if step_fn is None:
            step_fn = step_jit
            if jax.process_count() > 1:
              # NOTE: compiled, then every process waits for the others, so
              # that none enters the step's collectives long before the rest
              # (CPU collectives time out after 30 s).
              step_fn = step_jit.lower(state, batch, step_rng, frozen).compile()
              multihost.barrier("train step compiled")
          state, metrics, health = step_fn(state, batch, step_rng, frozen)
          algorithm.check_step(metrics, step + 1)
          loss, health = jax.device_get((metrics["loss"], health))
          loss = float(loss)
          last_good = "none" if last_saved is None else last_saved
          if not math.isfinite(loss):
            raise UserError(
                f"loss became {loss} at step {step + 1}; stopped without saving "
                f"(last good checkpoint: {last_good})")
          problem = _health_problem(health)
          if problem:
            raise UserError(
                f"{problem} in the update of step {step + 1} (loss {loss:.4g}); stopped without "
                f"saving (last good checkpoint: {last_good}); a lower learning rate may help")
          step += 1
          if step % config.log_every == 0 or step == train_steps:
            dt = time.perf_counter() - t0
            row = {k: v for k, v in jax.device_get(metrics).items()}
            row["tokens_per_sec"] = tokens / max(dt, 1e-9)
            row["steps_per_sec"] = config.log_every / max(dt, 1e-9)
            last_train = writer.write(step, row, "train")
            if bar is not None:
              bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{row['tokens_per_sec']:.0f}")
            tokens, t0 = 0, time.perf_counter()
          if bar is not None:
            bar.update(1)
          if step % config.checkpoint_every == 0 or step == train_steps:
            ckpt.save(step, state)
            last_saved = step
          if config.eval_every and (step % config.eval_every == 0 or step == train_steps):
            ev, samples = algorithm.evaluate(state["params"], step, aux=state["aux"])
            if ev:
              last_eval = writer.write(step, ev, "eval")
              evals.append(last_eval)
            if samples:
              writer.write_samples(step, samples)
            if config.stop_window and multihost.any_process(
                converged(evals, config.stop_window, config.stop_metric)):
              if last_saved != step:
                ckpt.save(step, state)
                last_saved = step
              stopped = True
              logging.info("converged at step %d (%s: no gain beyond its standard error over %d "
                           "evals)", step, config.stop_metric, config.stop_window)
              break
          # NOTE: every process asks at every step, so all agree on the step to
          # save at wherever the signal arrived (one small all-gather a step).
          if multihost.any_process(sigterm.set):
            if last_saved != step:
              ckpt.save(step, state)
            ckpt.wait()
            raise Preempted(f"SIGTERM: saved checkpoint at step {step} in {ckpt.directory}")
    finally:
      if bar is not None:
        bar.close()
      ckpt.close()
      writer.close()
  algorithm.final_state = state  # for callers that continue in-process (studies)
  return {"train": last_train, "eval": last_eval, "step": step, "evals": evals,
          "converged": stopped}
