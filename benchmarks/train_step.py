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

DeRa (`--algorithm dera`): one DeRa decode of a pair of models of `--size`
(the reference and the aligned one, lambda 0.5 per row): both prompts'
prefill over `input_length` tokens, then the one sampler's loop of
`target_length` new tokens over the mixed logits, jitted whole with the params
placed by the logical axis rules. `compile_s` and the memory figures are those
of that program; a run also times it (`step_s` per decode, new tokens/s).

Memory against the device (bad input, before anything is allocated): where the
backend reports its capacity (`bytes_limit`; GPUs and TPUs, not the CPU) or
`--device_memory_gib` gives it, a run first compiles the step on abstract
params (as `--compile_only` does) and stops with one line, exit 2, when its
per-device requirement (`memory_per_device_net_bytes`: arguments, outputs and
temporaries, less the donated state updated in place) exceeds the capacity.
With `--compile_only` the comparison is recorded (`fits`) and nothing stops.
A persistent compilation cache (`JAX_COMPILATION_CACHE_DIR`) makes the second
compilation of the same step a cache read. A batch the mesh cannot split is
refused the same way.

The compiled step's own cost analysis is recorded too (`compiled_tflops`,
`compiled_gb_accessed`: XLA's count, every op included, per device).

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
from realign_jax.plumbing.errors import UserError  # noqa: E402

# Dense bf16 peak FLOP/s by device kind (vendor figures, no sparsity).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12,
              "TPU v5e": 197e12, "TPU v5p": 459e12}


class CompiledOnly(Exception):
  """Raised in place of the first step under --compile_only."""


def compiled_figures(compiled) -> tuple:
  """(memory analysis in bytes per device, cost analysis) of a compiled program."""
  m = compiled.memory_analysis()
  memory = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in
            ("argument", "output", "temp", "alias", "generated_code")}
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) and cost else cost) or {}
  return memory, {"compiled_tflops": float(cost.get("flops", 0.0)) / 1e12,
                  "compiled_gb_accessed": float(cost.get("bytes accessed", 0.0)) / 1e9}


def memory_figures(mem: dict) -> dict:
  total = mem["argument"] + mem["output"] + mem["temp"]
  return {"memory_per_device_bytes": total,
          "memory_per_device_net_bytes": total - mem["alias"], "memory_bytes": mem}


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
    self.cost = None
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
        self.memory, self.cost = compiled_figures(c)
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



def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--algorithm", default="sft", choices=["sft", "ppo", "dpo", "dera"])
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
  p.add_argument("--device_memory_gib", type=float, default=None,
                 help="the device's capacity; default: what the backend reports (none on CPU)")
  p.add_argument("--json", action="store_true")
  return p.parse_args(argv)


def _algorithm(a, model, abstract):
  common = dict(model=model, batch_size=a.batch, input_length=a.input_length,
                abstract=abstract)
  if a.algorithm == "sft":
    return RandomSFT(target_length=a.target_length, num_eval_samples=0, **common)
  if a.algorithm == "dpo":
    return RandomDPO(target_length=a.target_length, **common)
  return RandomPPO(reward=LengthReward(min_length=4, max_length=16),
                   max_new_tokens=a.target_length, num_epochs=2, num_minibatches=2, **common)


def _timing_figures(timings, flops, tokens) -> dict:
  dev = jax.devices()[0]
  peak = next((v for k, v in PEAK_FLOPS.items() if k in dev.device_kind), None)
  step_s = float(statistics.median(timings))
  stats = dev.memory_stats() or {}
  return {"steps_timed": len(timings), "step_s": step_s, "step_s_min": float(np.min(timings)),
          "tokens_per_s": tokens / step_s,
          "mfu": (flops / step_s / (peak * jax.device_count())) if peak else None,
          "peak_memory_gib": stats.get("peak_bytes_in_use", 0) / 2**30 if stats else None}


def train_figures(a, cfg, mesh, rules, compile_only: bool) -> dict:
  """Compiles (and unless `compile_only` runs) the trainer's step: its figures."""
  model = LanguageModel(cfg)
  alg = _algorithm(a, model, compile_only)
  opt = optim.make_optimizer(name=a.optimizer, learning_rate=1e-4)
  result = None
  with tempfile.TemporaryDirectory() as d, StepCompiler(compile_only) as comp:
    cfg_t = trainer.TrainerConfig(checkpoint_every=10**9, eval_every=0, log_every=1,
                                  progress=False, async_checkpoint=False)
    t0 = time.perf_counter()
    try:
      result = trainer.train(algorithm=alg, model_dir=d, train_steps=1 if compile_only
                             else a.steps, optimizer=opt, mesh=mesh, rules=rules, config=cfg_t)
    except CompiledOnly:
      pass
    wall = time.perf_counter() - t0
  abstract_params, _ = model.abstract_init()
  enc, dec = _split_params(model, abstract_params)
  flops = model_flops(a.algorithm, model.family, enc, dec, a.batch, a.input_length,
                      a.target_length)
  out = {"params": enc + dec, "optimizer": a.optimizer, "compile_s": comp.compile_s,
         "compile_cpu_s": comp.compile_cpu_s, **memory_figures(comp.memory), **comp.cost,
         "model_tflops_per_step": flops / 1e12}
  if not compile_only:
    tokens = a.batch * (a.input_length + a.target_length * (2 if a.algorithm == "dpo" else 1))
    out.update(_timing_figures(np.diff(alg.timings)[1:], flops, tokens))  # compile excluded
    out["final_loss"] = result["train"].get("loss")
  out["wall_s"] = wall
  return out


def dera_figures(a, cfg, mesh, rules, compile_only: bool) -> dict:
  """Compiles (and unless `compile_only` runs) one DeRa decode of a pair of `cfg` models."""
  import flax.linen as nn
  import jax.numpy as jnp
  from realign_jax.decoding import dera, sampler
  from realign_jax.parallel.abstract import sharded_abstract
  lm = LanguageModel(cfg)
  config = sampler.with_tokens(sampler.SamplingConfig(max_new_tokens=a.target_length),
                               sampler.tokens_of(lm))
  eos = config.eos

  def decode(ref_params, aligned_params, inputs, rng):
    comps = [dera.Component(lm, ref_params), dera.Component(lm, aligned_params)]
    step = dera.mixed_step(comps, dera.dera_weights(jnp.full((inputs.shape[0],), 0.5)))

    def no_eos(tokens, cache):  # NOTE: every decode runs all target_length steps
      out, cache = step(tokens, cache)
      return out._replace(logits=out.logits.at[:, eos].set(-jnp.inf)), cache
    return sampler.sample_loop(no_eos, dera.prefill(comps, inputs, a.target_length),
                               jnp.zeros((inputs.shape[0],), jnp.int32), rng, config,
                               reference_index=dera.REF, with_components=True)

  t0 = time.perf_counter()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract = sharded_abstract(lm, mesh, rules)
    param_sh = jax.tree_util.tree_map(lambda s: s.sharding, abstract)
    in_sh = partitioning.batch_sharding(mesh)
    fn = jax.jit(decode, in_shardings=(param_sh, param_sh, in_sh, None))
    inputs = jax.ShapeDtypeStruct((a.batch, a.input_length), jnp.int32, sharding=in_sh)
    rng = jax.random.PRNGKey(0)
    c0, t1 = time.process_time(), time.perf_counter()
    compiled = fn.lower(abstract, abstract, inputs, rng).compile()
    compile_s, compile_cpu_s = time.perf_counter() - t1, time.process_time() - c0
    memory, cost = compiled_figures(compiled)
    n = count_params(abstract)
    # Two models, each a forward pass over the prompt and the new tokens (see model_flops).
    enc, dec = _split_params(lm, abstract)
    flops = 2 * 2.0 * a.batch * (enc * a.input_length + dec * a.target_length
                                 if lm.family == "t5" else dec * (a.input_length + a.target_length))
    out = {"params": n, "models": 2, "lambda": 0.5, "compile_s": compile_s,
           "compile_cpu_s": compile_cpu_s, **memory_figures(memory), **cost,
           "model_tflops_per_step": flops / 1e12}
    if not compile_only:
      ref = reward_model.init_params_sharded(lm, mesh, rules, 0)
      aligned = reward_model.init_params_sharded(lm, mesh, rules, 1)
      ids = np.random.default_rng(0).integers(2, lm.vocab_size, (a.batch, a.input_length),
                                              dtype=np.int32)
      ids = jax.device_put(ids, in_sh)
      times = []
      for _ in range(max(a.steps, 2)):
        t2 = time.perf_counter()
        jax.block_until_ready(compiled(ref, aligned, ids, rng))
        times.append(time.perf_counter() - t2)
      out.update(_timing_figures(times[1:], flops, a.batch * a.target_length))
  out["wall_s"] = time.perf_counter() - t0
  return out


def _capacity(a) -> int:
  """The device's memory in bytes: --device_memory_gib, else the backend's figure, else 0."""
  if a.device_memory_gib is not None:
    return int(a.device_memory_gib * 2**30)
  return int((jax.devices()[0].memory_stats() or {}).get("bytes_limit", 0))


def main(argv=None):
  a = parse_args(argv)
  try:
    overrides = {"dtype": a.dtype}
    for key in ("scan_layers", "remat_policy", "attention_impl"):
      if getattr(a, key) is not None:
        overrides[key] = getattr(a, key)
    cfg = sizes.load(a.size, **overrides)
    mesh = partitioning.create_mesh(a.mesh_data, a.mesh_model)
    partitioning.check_batch_divides(a.batch, mesh, "--batch")
    if a.algorithm == "ppo":
      partitioning.check_batch_divides(a.batch // 2, mesh, "the PPO minibatch (--batch / 2)")
    rules = partitioning.logical_axis_rules(a.fsdp)
    partitioning.check_params_divide(*LanguageModel(cfg).abstract_init(), mesh, rules, a.size)
  except UserError as e:
    print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
    return 2
  bench = dera_figures if a.algorithm == "dera" else train_figures
  capacity = _capacity(a)
  preflight = None
  if capacity and not a.compile_only:
    # NOTE: compiled on abstract params first, so a size that cannot fit stops
    # before anything is allocated; the run's own compile then reads the cache.
    preflight = bench(a, cfg, mesh, rules, compile_only=True)
    need = preflight["memory_per_device_net_bytes"]
    if need > capacity:
      print(f"error: the {a.algorithm} step of {a.size} (batch {a.batch}, {a.input_length}/"
            f"{a.target_length} tokens) needs {need / 2**30:.3g} GiB per device, the device has "
            f"{capacity / 2**30:.3g} GiB; use a smaller --batch, --remat_policy=full, --fsdp or "
            f"more devices", file=sys.stderr)
      return 2
  dev = jax.devices()[0]
  out = {"algorithm": a.algorithm, "device": f"{dev.platform}:{dev.device_kind}",
         "num_devices": jax.device_count(), "mesh": dict(mesh.shape), "fsdp": a.fsdp,
         "size": a.size, "dtype": a.dtype, "scan_layers": cfg.scan_layers,
         "remat_policy": cfg.remat_policy, "attention_impl": cfg.attention_impl,
         "batch": a.batch, "input_length": a.input_length, "target_length": a.target_length}
  out.update(bench(a, cfg, mesh, rules, compile_only=a.compile_only))
  if preflight:  # the first compilation's time (the run's may have read the cache)
    out["preflight_compile_s"] = preflight["compile_s"]
  if capacity:
    out["device_memory_bytes"] = capacity
    out["fits"] = out["memory_per_device_net_bytes"] <= capacity
  print(json.dumps(out) if a.json else json.dumps(out, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
