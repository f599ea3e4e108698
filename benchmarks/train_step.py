r"""Train-step cost (SFT, PPO or DPO) through the one trainer loop, with random tokens.

  python benchmarks/train_step.py --size t5_1_1_large --dtype bfloat16 \
      --batch 32 --input_length 512 --target_length 128 --steps 20 --json
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/train_step.py \
      --json --algorithm ppo --size t5_1_1_large --batch 16 --input_length 256 \
      --target_length 32 --fsdp --compile_only [--scan_layers=false]

Runs `realign_jax.training.trainer.train` (the same jitted, sharded step the
train binary runs) on an algorithm whose batches are random token ids, so no
data set or TensorFlow is needed. The step is compiled ahead of time on its
own: `compile_s` times `jit(step).lower(...).compile()` (tracing, lowering
and XLA together; `compile_cpu_s` the CPU seconds it took, which a busy
machine does not inflate), and the compiled program's memory analysis gives the
argument, output and temporary bytes per device (`memory_per_device_bytes`
is their sum; `memory_per_device_net_bytes` subtracts the outputs aliased to
donated arguments, i.e. the train state updated in place). With
`--compile_only` nothing is initialised or run (params stay abstract), so
sizes far beyond this machine's memory can be measured. Otherwise the timed
steps follow: median step time (compile excluded), tokens/s, model FLOPs per
step and MFU where the device's peak is known.

PPO: one rollout of `target_length` new tokens per prompt by the jitted
KV-cache sampler, the policy's and the frozen reference's teacher-forced
passes, then `num_epochs x num_minibatches` (2 x 2) updates, with the length
reward. DPO: the reference's and the policy's passes over chosen and rejected
responses (each `target_length` long) of the same prompts.

Model FLOPs: with F = encoder params x input tokens + decoder params x target
tokens (T5, embedding and output matrices counted with the decoder; a
decoder-only model counts all params over input + target tokens), the usual
matmul-only count, attention's score and value products excluded: SFT 6F
(forward and backward); DPO 2 x (6F + 2F) (chosen and rejected, the
reference forward only); PPO (2 + 2 + 2 + 6 x epochs) F (rollout, policy and
reference passes, the updates). MFU divides by the dense bf16 peak of the
device kind (fp32 runs against the same figure), None where unknown (CPU).
"""

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from realign_jax.models import sizes  # noqa: E402
from realign_jax.models.api import LanguageModel, count_params  # noqa: E402
from realign_jax.parallel import partitioning  # noqa: E402
from realign_jax.training import optim, trainer  # noqa: E402
from realign_jax.training.sft import SFT  # noqa: E402
from realign_jax.training.ppo import PPO  # noqa: E402
from realign_jax.training.dpo import DPO  # noqa: E402
from realign_jax.training import reward_model  # noqa: E402
from realign_jax.rewards.length import LengthReward  # noqa: E402
from realign_jax.errors import UserError  # noqa: E402

# Dense bf16 peak FLOP/s by device kind (vendor figures, no sparsity).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12,
              "TPU v5e": 197e12, "TPU v5p": 459e12}


class CompiledOnly(Exception):
  """Raised in place of the first step under --compile_only."""


class StepCompiler:
  """Compiles the trainer's step ahead of time, timed on its own.

  Installed as `jax.jit` while the trainer builds its step: the function
  named `train_step` is lowered and compiled at its first call (the timing
  and the memory analysis recorded) and then run compiled. Under
  `compile_only`, the jit of `state_from_params` returns the abstract
  state (with its shardings) instead of computing it, and the first step
  raises CompiledOnly once compiled.
  """

  def __init__(self, compile_only: bool):
    self.compile_only = compile_only
    self.compile_s = None
    self.compile_cpu_s = None  # CPU seconds of all the process's threads (robust to load)
    self.memory = None
    self._real_jit = jax.jit

  def __enter__(self):
    jax.jit = self._jit
    return self

  def __exit__(self, *exc):
    jax.jit = self._real_jit

  def _jit(self, fun, *args, **kwargs):
    real = self._real_jit(fun, *args, **kwargs)
    name = getattr(fun, "__name__", "")
    if name == "train_step":
      return self._step(real)
    if name == "state_from_params" and self.compile_only:
      out_sh = kwargs.get("out_shardings")
      return lambda *a: jax.tree_util.tree_map(
          lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
          jax.eval_shape(fun, *a), out_sh)
    return real

  def _step(self, real):
    compiled = []

    def call(*args):
      if not compiled:
        t0, c0 = time.perf_counter(), time.process_time()
        c = real.lower(*args).compile()
        self.compile_s = time.perf_counter() - t0
        self.compile_cpu_s = time.process_time() - c0
        m = c.memory_analysis()
        self.memory = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in
                       ("argument", "output", "temp", "alias", "generated_code")}
        compiled.append(c)
        if self.compile_only:
          raise CompiledOnly()
      return compiled[0](*args)
    return call


@dataclasses.dataclass
class RandomSFT(SFT):
  """SFT on random token ids (no data pipeline, no evaluation)."""

  timings: list = dataclasses.field(default_factory=list)
  abstract: bool = False  # params never materialised (compile only)

  def setup(self, mesh, rules):
    del rules
    self._mesh = mesh

  def initial_params(self, abstract_params):
    return abstract_params if self.abstract else None

  def batches(self, start_step):
    return _random_batches(self, self.model.vocab_size, self.batch_size,
                           {"inputs": self.input_length, "targets": self.target_length},
                           start_step)

  def evaluate(self, params, step, aux=None):
    return {}, []


def _random_batches(alg, v, batch, lengths, start_step):
  rng = np.random.default_rng(start_step)
  while True:
    out = {}
    for key, length in lengths.items():
      ids = rng.integers(2, v, (batch, length), dtype=np.int32)
      ids[:, -1] = 1
      out[key] = ids
    # NOTE: the loop syncs on the loss every step, so the gap between two
    # batch requests is one whole step (dispatch, compute, host read).
    alg.timings.append(time.perf_counter())
    yield out


@dataclasses.dataclass
class RandomPPO(PPO):
  """PPO on random prompts (no data pipeline, no evaluation)."""

  timings: list = dataclasses.field(default_factory=list)
  abstract: bool = False

  def _start_params(self, lm):
    return self._abstract(lm) if self.abstract else super()._start_params(lm)

  def batches(self, start_step):
    return _random_batches(self, self.model.vocab_size, self.batch_size,
                           {"inputs": self.input_length}, start_step)

  def evaluate(self, params, step, aux=None):
    return {}, []


@dataclasses.dataclass
class RandomDPO(DPO):
  """DPO on random (prompt, chosen, rejected) ids; the reference is the init."""

  timings: list = dataclasses.field(default_factory=list)
  abstract: bool = False

  def setup(self, mesh, rules):
    self._mesh, self._rules = mesh, rules
    self._ref = self.initial_params(None)

  def initial_params(self, abstract_params):
    del abstract_params
    if self.abstract:
      return reward_model.sharded_abstract(self.model, self._mesh, self._rules)
    return reward_model.init_params_sharded(self.model, self._mesh, self._rules,
                                            self.reference_seed)

  def batches(self, start_step):
    return _random_batches(self, self.model.vocab_size, self.batch_size,
                           {"inputs": self.input_length, "chosen": self.target_length,
                            "rejected": self.target_length}, start_step)

  def evaluate(self, params, step, aux=None):
    return {}, []


def _split_params(model, params):
  """(encoder-side, decoder-side) parameter counts for T5; (0, all) otherwise."""
  if model.family != "t5":
    return 0, count_params(params)
  enc = sum(count_params(v) for k, v in params.items() if k.startswith("encoder"))
  return enc, count_params(params) - enc


def model_flops(algorithm, family, enc, dec, batch, input_length, target_length, epochs=2):
  """Matmul FLOPs of one step (see the module docstring)."""
  if family == "t5":
    f = batch * (enc * input_length + dec * target_length)
  else:
    f = batch * dec * (input_length + target_length)
  return {"sft": 6.0 * f, "dpo": 2 * 8.0 * f, "ppo": (6.0 + 6.0 * epochs) * f}[algorithm]


def _bool(text):
  if text.lower() in ("true", "1", "yes"):
    return True
  if text.lower() in ("false", "0", "no"):
    return False
  raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--algorithm", default="sft", choices=["sft", "ppo", "dpo"])
  p.add_argument("--size", default="t5_tiny")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--input_length", type=int, default=128)
  p.add_argument("--target_length", type=int, default=32)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--optimizer", default="adafactor")
  p.add_argument("--fsdp", action="store_true")
  p.add_argument("--compile_only", action="store_true",
                 help="compile the step and report compile time and memory; run nothing")
  p.add_argument("--scan_layers", type=_bool, nargs="?", const=True, default=None,
                 help="true|false; default: the size's gin file")
  p.add_argument("--remat_policy", default=None, help="none|dots_saveable|full; default: the "
                 "size's gin file")
  p.add_argument("--attention_impl", default=None, help="einsum|dot_product")
  p.add_argument("--mesh_data", type=int, default=-1)
  p.add_argument("--mesh_model", type=int, default=1)
  p.add_argument("--json", action="store_true")
  a = p.parse_args()

  try:
    overrides = {"dtype": a.dtype}
    for key in ("scan_layers", "remat_policy", "attention_impl"):
      if getattr(a, key) is not None:
        overrides[key] = getattr(a, key)
    cfg = sizes.load(a.size, **overrides)
    mesh = partitioning.create_mesh(a.mesh_data, a.mesh_model)
    mb = a.batch // 2 if a.algorithm == "ppo" else a.batch
    partitioning.check_batch_divides(a.batch, mesh, "--batch")
    partitioning.check_batch_divides(mb, mesh, "the PPO minibatch (--batch / 2)")
  except UserError as e:
    print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
    return 2
  model = LanguageModel(cfg)
  common = dict(model=model, batch_size=a.batch, input_length=a.input_length,
                abstract=a.compile_only)
  if a.algorithm == "sft":
    alg = RandomSFT(target_length=a.target_length, num_eval_samples=0, **common)
  elif a.algorithm == "dpo":
    alg = RandomDPO(target_length=a.target_length, **common)
  else:
    alg = RandomPPO(reward=LengthReward(min_length=4, max_length=16),
                    max_new_tokens=a.target_length, num_epochs=2, num_minibatches=2, **common)
  opt = optim.make_optimizer(name=a.optimizer, learning_rate=1e-4)
  steps = 1 if a.compile_only else a.steps
  result = None
  with tempfile.TemporaryDirectory() as d, StepCompiler(a.compile_only) as comp:
    cfg_t = trainer.TrainerConfig(checkpoint_every=10**9, eval_every=0, log_every=1,
                                  progress=False, async_checkpoint=False)
    t0 = time.perf_counter()
    try:
      result = trainer.train(algorithm=alg, model_dir=d, train_steps=steps, optimizer=opt,
                             mesh=mesh, rules=partitioning.logical_axis_rules(a.fsdp),
                             config=cfg_t)
    except CompiledOnly:
      pass
    wall = time.perf_counter() - t0
  abstract_params, _ = model.abstract_init()
  enc, dec = _split_params(model, abstract_params)
  flops = model_flops(a.algorithm, model.family, enc, dec, a.batch, a.input_length,
                      a.target_length)
  dev = jax.devices()[0]
  kind = dev.device_kind
  peak = next((v for k, v in PEAK_FLOPS.items() if k in kind), None)
  mem = comp.memory
  out = {
      "algorithm": a.algorithm, "device": f"{dev.platform}:{kind}",
      "num_devices": jax.device_count(), "mesh": dict(mesh.shape), "fsdp": a.fsdp,
      "size": a.size, "dtype": a.dtype, "scan_layers": cfg.scan_layers,
      "remat_policy": cfg.remat_policy, "attention_impl": cfg.attention_impl,
      "params": enc + dec, "batch": a.batch, "input_length": a.input_length,
      "target_length": a.target_length, "optimizer": a.optimizer,
      "compile_s": comp.compile_s, "compile_cpu_s": comp.compile_cpu_s,
      "memory_per_device_bytes": mem["argument"] + mem["output"] + mem["temp"],
      "memory_per_device_net_bytes": mem["argument"] + mem["output"] + mem["temp"]
                                     - mem["alias"],
      "memory_bytes": mem, "model_tflops_per_step": flops / 1e12,
  }
  if not a.compile_only:
    steps_t = np.diff(alg.timings)[1:]  # drop the first step (compilation)
    step_s = float(statistics.median(steps_t))
    tokens = a.batch * (a.input_length + a.target_length * (2 if a.algorithm == "dpo" else 1))
    stats = dev.memory_stats() or {}
    out.update({
        "steps_timed": len(steps_t), "step_s": step_s, "step_s_min": float(np.min(steps_t)),
        "tokens_per_s": tokens / step_s,
        "mfu": (flops / step_s / (peak * jax.device_count())) if peak else None,
        "peak_memory_gib": stats.get("peak_bytes_in_use", 0) / 2**30 if stats else None,
        "final_loss": result["train"].get("loss"),
    })
  out["wall_s"] = wall
  print(json.dumps(out) if a.json else json.dumps(out, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
