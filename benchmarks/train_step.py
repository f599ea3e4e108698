r"""Train-step throughput (SFT or PPO) through the one trainer loop, with random tokens.

  python benchmarks/train_step.py --size t5_1_1_large --dtype bfloat16 \
      --batch 32 --input_length 512 --target_length 128 --steps 20 --json
  python benchmarks/train_step.py --algorithm ppo --size t5_1_1_large \
      --batch 32 --input_length 512 --target_length 64 --steps 6 --json

PPO: one rollout of `target_length` new tokens per prompt by the jitted
KV-cache sampler, the policy's and the frozen reference's teacher-forced
passes, then `num_epochs x num_minibatches` (2 x 2) updates, with the length
reward (tokens); its MFU is not reported (the rollout is memory-bound
decoding, not a matmul count).

Runs `realign_jax.training.trainer.train` (the same jitted, sharded step the
train binary runs) on an SFT algorithm whose batches are random token ids, so
no data set or TensorFlow is needed. Prints one JSON object: median step time
(compile excluded), tokens/s, peak device memory, and model FLOP utilisation.

Model FLOPs per step: 6 x (encoder params x input tokens + decoder params x
target tokens) for T5 (embedding and output matrices counted with the
decoder), 6 x params x tokens for a decoder-only model: the usual
matmul-only count, attention's score and value products excluded (small at
these lengths), so MFU is a slight underestimate. Peak FLOP/s is looked up
by device kind (dense bf16; fp32 runs are reported against the same figure).
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
from realign_jax.rewards.length import LengthReward  # noqa: E402

# Dense bf16 peak FLOP/s by device kind (vendor figures, no sparsity).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12,
              "TPU v5e": 197e12, "TPU v5p": 459e12}


@dataclasses.dataclass
class RandomSFT(SFT):
  """SFT on random token ids (no data pipeline, no evaluation)."""

  timings: list = dataclasses.field(default_factory=list)

  def setup(self, mesh, rules):
    del rules
    self._mesh = mesh

  def batches(self, start_step):
    return _random_batches(self, self.model.vocab_size, self.batch_size, self.input_length,
                           self.target_length, True, start_step)

  def evaluate(self, params, step, aux=None):
    return {}, []


def _random_batches(alg, v, batch, input_length, target_length, with_targets, start_step):
  rng = np.random.default_rng(start_step)
  while True:
    inputs = rng.integers(2, v, (batch, input_length), dtype=np.int32)
    inputs[:, -1] = 1
    out = {"inputs": inputs}
    if with_targets:
      targets = rng.integers(2, v, (batch, target_length), dtype=np.int32)
      targets[:, -1] = 1
      out["targets"] = targets
    # NOTE: the loop syncs on the loss every step, so the gap between two
    # batch requests is one whole step (dispatch, compute, host read).
    alg.timings.append(time.perf_counter())
    yield out


@dataclasses.dataclass
class RandomPPO(PPO):
  """PPO on random prompts (no data pipeline, no evaluation)."""

  timings: list = dataclasses.field(default_factory=list)

  def batches(self, start_step):
    return _random_batches(self, self.model.vocab_size, self.batch_size, self.input_length,
                           self.max_new_tokens, False, start_step)

  def evaluate(self, params, step, aux=None):
    return {}, []


def _split_params(model, params):
  """(encoder-side, decoder-side) parameter counts for T5; (0, all) otherwise."""
  if model.family != "t5":
    return 0, count_params(params)
  enc = sum(count_params(v) for k, v in params.items() if k.startswith("encoder"))
  return enc, count_params(params) - enc


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--algorithm", default="sft", choices=["sft", "ppo"])
  p.add_argument("--size", default="t5_tiny")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--input_length", type=int, default=128)
  p.add_argument("--target_length", type=int, default=32)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--optimizer", default="adafactor")
  p.add_argument("--fsdp", action="store_true")
  p.add_argument("--json", action="store_true")
  a = p.parse_args()

  cfg = sizes.load(a.size, dtype=a.dtype)
  model = LanguageModel(cfg)
  if a.algorithm == "sft":
    alg = RandomSFT(model=model, batch_size=a.batch, input_length=a.input_length,
                    target_length=a.target_length, num_eval_samples=0)
  else:
    alg = RandomPPO(model=model, reward=LengthReward(min_length=4, max_length=16),
                    batch_size=a.batch, input_length=a.input_length,
                    max_new_tokens=a.target_length, num_epochs=2, num_minibatches=2)
  opt = optim.make_optimizer(name=a.optimizer, learning_rate=1e-4)
  with tempfile.TemporaryDirectory() as d:
    cfg_t = trainer.TrainerConfig(checkpoint_every=10**9, eval_every=0, log_every=1,
                                  progress=False, async_checkpoint=False)
    t0 = time.perf_counter()
    result = trainer.train(algorithm=alg, model_dir=d, train_steps=a.steps, optimizer=opt,
                           mesh=partitioning.create_mesh(),
                           rules=partitioning.logical_axis_rules(a.fsdp), config=cfg_t)
    wall = time.perf_counter() - t0
    params = alg.final_state["params"]
  steps = np.diff(alg.timings)[1:]  # drop the first step (compilation)
  step_s = float(statistics.median(steps))
  enc, dec = _split_params(model, params)
  toks_in = a.batch * a.input_length
  toks_out = a.batch * a.target_length
  if a.algorithm == "ppo":
    flops = None
  elif model.family == "t5":
    flops = 6.0 * (enc * toks_in + dec * toks_out)
  else:
    flops = 6.0 * dec * (toks_in + toks_out)
  dev = jax.devices()[0]
  kind = dev.device_kind
  peak = next((v for k, v in PEAK_FLOPS.items() if k in kind), None)
  stats = dev.memory_stats() or {}
  out = {
      "algorithm": a.algorithm, "device": f"{dev.platform}:{kind}", "num_devices": jax.device_count(), "size": a.size,
      "dtype": a.dtype, "params": enc + dec, "batch": a.batch, "input_length": a.input_length,
      "target_length": a.target_length, "optimizer": a.optimizer, "steps_timed": len(steps),
      "step_s": step_s, "step_s_min": float(np.min(steps)),
      "tokens_per_s": (toks_in + toks_out) / step_s,
      "model_tflops_per_step": flops / 1e12 if flops else None,
      "mfu": (flops / step_s / (peak * jax.device_count())) if peak and flops else None,
      "peak_memory_gib": stats.get("peak_bytes_in_use", 0) / 2**30 if stats else None,
      "final_loss": result["train"].get("loss"), "wall_s": wall,
  }
  print(json.dumps(out) if a.json else json.dumps(out, indent=2))


if __name__ == "__main__":
  sys.exit(main())
