r"""Transfer Q* rollouts: forked KV caches against re-generating each rollout from scratch.

  python benchmarks/transfer_q.py --json [--sizes t5_tiny,t5_1_1_small] [--new_tokens 8]

Random weights, batch 4, k = 10 candidates, horizon H = 20, m = 1 rollout per
candidate, prompts of 32 tokens, `new_tokens` decoded tokens (EOS masked in
every model, so each call runs every step and every rollout to H). The same
decode runs three ways (`transfer_q.ROLLOUTS`), all giving the same tokens:
  fork       the baseline's cache of the prefix forked k ways (this project);
  recompute  every rollout token from a full forward pass, no KV cache (the
             authors' public code re-generates rollouts without a cache);
  refeed     per rollout: the prompt re-encoded and the prefix re-fed, then a
             cached rollout.
Prints one JSON object: per size the seconds per decode and per decoded token,
and at the top level `forked_speedup` = recompute time / fork time at the
T5.1.1-small size (target >= 5) and `refeed_speedup` likewise.
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

from realign_jax.decoding import sampler  # noqa: E402
from realign_jax.decoding import transfer_q as tq  # noqa: E402
from realign_jax.decoding.dera import Component  # noqa: E402
from realign_jax.models import sizes  # noqa: E402
from realign_jax.models.api import LanguageModel  # noqa: E402


class _NoEos:
  """A LanguageModel whose EOS logit is -inf, so every rollout runs to H."""

  def __init__(self, lm):
    self._lm = lm

  def __getattr__(self, name):
    return getattr(self._lm, name)

  def step(self, params, tokens, cache):
    logits, cache = self._lm.step(params, tokens, cache)
    return logits.at[:, sampler.EOS_ID].set(-jnp.inf), cache

  def forward(self, params, inputs, targets, **kw):
    out = dict(self._lm.forward(params, inputs, targets, **kw))
    out["logits"] = out["logits"].at[..., sampler.EOS_ID].set(-jnp.inf)
    return out


def _reward(inputs, responses, lengths):
  """A cheap traceable reward: the fraction of even token ids."""
  del inputs
  live = jnp.arange(responses.shape[1])[None] < lengths[:, None]
  return jnp.sum(live & (responses % 2 == 0), axis=1) / jnp.maximum(lengths, 1)


def _timed(fn, repeats):
  out = jax.block_until_ready(fn())  # compile + warm up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times), out


def bench_size(name, batch, new_tokens, k, horizon, repeats, input_length=32):
  cfg = sizes.load(name, dropout_rate=0.0, dtype="float32")
  lm = _NoEos(LanguageModel(cfg))
  ref = Component(lm, lm.init(jax.random.PRNGKey(0))[0])
  base = Component(lm, lm.init(jax.random.PRNGKey(1))[0])
  inputs = jax.random.randint(jax.random.PRNGKey(2), (batch, input_length), 2, cfg.vocab_size)
  inputs = inputs.at[:, -1].set(sampler.EOS_ID)
  dcfg = sampler.SamplingConfig(max_new_tokens=new_tokens)
  rng = jax.random.PRNGKey(3)
  row = {"params": sum(x.size for x in jax.tree_util.tree_leaves(ref.params))}
  tokens = {}
  for how in ("fork", "recompute", "refeed"):
    # NOTE: alpha = 1 is the same policy under either alpha_convention (temperature 1);
    # the timing does not depend on it.
    tcfg = tq.TQConfig(top_k=k, horizon=horizon, alpha=1.0, rollouts=how)
    tq.validate_tq(ref, base, tcfg)
    run = jax.jit(lambda r, tcfg=tcfg: tq.transfer_q(ref, base, inputs, r, dcfg, tcfg,
                                                     _reward)[0].tokens)
    secs, toks = _timed(lambda: run(rng), repeats if how == "fork" else 1)
    tokens[how] = toks
    row[f"{how}_s"] = secs
    row[f"{how}_s_per_token"] = secs / new_tokens
    print(f"{name} {how}: {secs:.3f} s", file=sys.stderr)
  row["same_tokens"] = all(bool(jnp.all(tokens["fork"] == tokens[h])) for h in tokens)
  row["forked_speedup"] = row["recompute_s"] / row["fork_s"]
  row["refeed_speedup"] = row["refeed_s"] / row["fork_s"]
  return row


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--json", action="store_true", help="print one JSON object")
  p.add_argument("--sizes", default="t5_tiny,t5_1_1_small")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--new_tokens", type=int, default=8)
  p.add_argument("--k", type=int, default=10)
  p.add_argument("--horizon", type=int, default=20)
  p.add_argument("--repeats", type=int, default=3)
  a = p.parse_args()
  names = a.sizes.split(",")
  dev = jax.devices()[0]
  result = {"device": f"{dev.platform}:{dev.device_kind}", "cpu_count": os.cpu_count(),
            "machine": platform.machine(), "batch": a.batch, "new_tokens": a.new_tokens,
            "k": a.k, "horizon": a.horizon, "num_rollouts": 1, "sizes": {}}
  for name in names:
    result["sizes"][name] = bench_size(name, a.batch, a.new_tokens, a.k, a.horizon, a.repeats)
    print(f"{name}: {json.dumps(result['sizes'][name])}", file=sys.stderr)
  big = "t5_1_1_small" if "t5_1_1_small" in names else names[-1]
  result["forked_speedup"] = result["sizes"][big]["forked_speedup"]
  result["refeed_speedup"] = result["sizes"][big]["refeed_speedup"]
  print(json.dumps(result) if a.json else json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
