r"""Decoding throughput: single model, DeRa (two models), and a K=6 lambda sweep.

  python benchmarks/decode.py --json [--sizes t5_tiny,t5_1_1_small] [--repeats 3]

Random weights, batch 8, 64 new tokens (EOS masked so every call decodes all
64 positions). Prints one JSON object: figures per size and, at the top level,
`dera_over_single` (DeRa time / single-model time at the T5.1.1-small size;
two forward passes per token make 2 the floor) and `sweep_speedup` (six
separate DeRa calls / one batched call over the six lambdas, tiny size).

Memory-bound decoding: per size, `param_bytes_per_step` is the parameter
bytes one decoding step of one model reads (every decoder-side matrix; T5's
encoder runs once per prompt, and an untied input embedding is read one row
per token, so neither is counted), `single_param_gb_per_s` /
`dera_param_gb_per_s` those bytes (twice for DeRa) per step time, and
`copy_gb_per_s` (top level) the machine's memory bandwidth measured in the
same run: a jitted `x + 1` over a COPY_BYTES float32 array, read once and
written once. Step times include the prompt's prefill (one call), so the
achieved figures are slight underestimates.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from realign_jax.decoding import dera, sampler  # noqa: E402
from realign_jax.models import sizes  # noqa: E402
from realign_jax.models.api import LanguageModel  # noqa: E402

LAMBDAS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
COPY_BYTES = 512 * 2**20


def copy_bandwidth(repeats: int) -> float:
  """Bytes/s of a large element-wise pass (COPY_BYTES read + COPY_BYTES written)."""
  x = jnp.zeros((COPY_BYTES // 4,), jnp.float32)
  fn = jax.jit(lambda a: a + 1.0)
  return 2 * COPY_BYTES / _timed(lambda: fn(x), max(repeats, 3))


def param_bytes_per_step(lm, params) -> int:
  """Parameter bytes one decoding step reads (see the module docstring)."""
  def nbytes(tree):
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))
  skip = {"token_embedder", "embed_tokens"} if not lm.config.tie_embeddings else set()
  return int(sum(nbytes(v) for k, v in params.items()
                 if k not in skip and not k.startswith("encoder")))


def _no_eos(step):
  def wrapped(tok, cache):
    out, cache = step(tok, cache)
    if isinstance(out, sampler.MixedLogits):
      return out._replace(logits=out.logits.at[:, sampler.EOS_ID].set(-jnp.inf)), cache
    return out.at[:, sampler.EOS_ID].set(-jnp.inf), cache
  return wrapped


def _timed(fn, repeats):
  jax.block_until_ready(fn())  # compile + warm up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def bench_size(name, batch, new_tokens, repeats, input_length=64):
  cfg = sizes.load(name, dropout_rate=0.0, dtype="float32")
  lm = LanguageModel(cfg)
  ref = dera.Component(lm, lm.init(jax.random.PRNGKey(0))[0])
  al = dera.Component(lm, lm.init(jax.random.PRNGKey(1))[0])
  inputs = jax.random.randint(jax.random.PRNGKey(2), (batch, input_length), 2, cfg.vocab_size)
  inputs = inputs.at[:, -1].set(sampler.EOS_ID)
  scfg = sampler.SamplingConfig(max_new_tokens=new_tokens)
  rng = jax.random.PRNGKey(3)

  @jax.jit
  def single(r):
    cache, first = lm.prefill(ref.params, inputs, new_tokens)
    return sampler.sample_loop(_no_eos(lambda t, c: lm.step(ref.params, t, c)), cache, first, r,
                               scfg).tokens

  def mixture(lam_rows, n):
    cache = dera.repeat(dera.prefill([ref, al], inputs, new_tokens), n)
    step = _no_eos(dera.mixed_step([ref, al], dera.dera_weights(lam_rows)))
    return cache, step

  @jax.jit
  def dera_one(r, lam):
    cache, step = mixture(jnp.full((batch,), lam), 1)
    return sampler.sample_loop(step, cache, jnp.zeros((batch,), jnp.int32), r, scfg,
                               reference_index=0, with_components=True).tokens

  @jax.jit
  def sweep(r):
    k = len(LAMBDAS)
    cache, step = mixture(jnp.tile(jnp.asarray(LAMBDAS), batch), k)
    return sampler.sample_loop(step, cache, jnp.zeros((batch * k,), jnp.int32), r, scfg,
                               row_ids=jnp.repeat(jnp.arange(batch), k), reference_index=0,
                               with_components=True).tokens

  t_single = _timed(lambda: single(rng), repeats)
  t_dera = _timed(lambda: dera_one(rng, 0.5), repeats)
  t_sep = _timed(lambda: [dera_one(rng, lam) for lam in LAMBDAS], repeats)
  t_sweep = _timed(lambda: sweep(rng), repeats)
  tokens = batch * new_tokens
  step_bytes = param_bytes_per_step(lm, ref.params)
  return {
      "params": sum(x.size for x in jax.tree_util.tree_leaves(ref.params)),
      "param_bytes_per_step": step_bytes,
      "single_param_gb_per_s": step_bytes * new_tokens / t_single / 1e9,
      "dera_param_gb_per_s": 2 * step_bytes * new_tokens / t_dera / 1e9,
      "single_s": t_single, "dera_s": t_dera, "six_separate_s": t_sep, "sweep_batched_s": t_sweep,
      "single_tokens_per_s": tokens / t_single, "dera_tokens_per_s": tokens / t_dera,
      "sweep_tokens_per_s": tokens * len(LAMBDAS) / t_sweep,
      "dera_over_single": t_dera / t_single, "sweep_speedup": t_sep / t_sweep,
  }


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--json", action="store_true", help="print one JSON object")
  p.add_argument("--sizes", default="t5_tiny,t5_1_1_small")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--new_tokens", type=int, default=64)
  p.add_argument("--repeats", type=int, default=3)
  a = p.parse_args()
  names = a.sizes.split(",")
  result = {"device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}",
            "cpu_count": os.cpu_count(), "machine": platform.machine(),
            "copy_gb_per_s": copy_bandwidth(a.repeats) / 1e9,
            "batch": a.batch, "new_tokens": a.new_tokens, "lambdas": list(LAMBDAS), "sizes": {}}
  for name in names:
    result["sizes"][name] = bench_size(name, a.batch, a.new_tokens, a.repeats)
    print(f"{name}: {json.dumps(result['sizes'][name])}", file=sys.stderr)
  big = "t5_1_1_small" if "t5_1_1_small" in names else names[-1]
  tiny = "t5_tiny" if "t5_tiny" in names else names[0]
  result["dera_over_single"] = result["sizes"][big]["dera_over_single"]
  result["sweep_speedup"] = result["sizes"][tiny]["sweep_speedup"]
  if a.json:
    print(json.dumps(result))
  else:
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
