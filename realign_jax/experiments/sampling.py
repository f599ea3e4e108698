"""What the studies decode: a policy against its reference, and a DeRa lambda sweep.

Both go through THE sampler (`decoding.dera.sample_mixture`, one jitted
`lax.while_loop` with KV caches), so every row carries the exact sequence KL
to the reference (the sum over steps of the full-vocabulary KL) and the
sequence log-ratio:

- `policy_fn`: a policy pi alone, written as the mixture (1, 0) over
  (pi, pi_ref) (bit-identical to pi's logits), so the KL to pi_ref comes out
  of the same loop;
- `sweep_fn`: DeRa, all lambdas in one batched call (`dera.dera_sweep`).

Row seeds are shared: prompt b, sample j draws with seed `b * n + j` in both,
so DeRa at lambda = 1 reproduces the aligned model's samples token for token
and DeRa at lambda = 0 the reference's (a check the studies report).

Params are passed as arguments, so one compiled function serves every
checkpoint of one architecture.

On several processes (jax.distributed) every process runs every batch on the
global mesh with the same host inputs, and each gets the whole batch's
outputs (`_to_host`): all compute the same rows.
"""

import functools
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from realign_jax.data import vocab as vocab_lib
from realign_jax.decoding import dera, sampler
from realign_jax.models.api import LanguageModel
from realign_jax.parallel import partitioning
from realign_jax.rewards import base as rewards_base
from realign_jax.training import policy as policy_lib


def mesh_and_rules():
  return partitioning.create_mesh(), partitioning.logical_axis_rules()


def load_lm_params(run_dir: str, lm: LanguageModel, mesh, rules):
  """The language-model params of a run directory (a value head, if any, dropped), sharded."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract, axes = lm.abstract_init()
    shardings = partitioning.logical_to_mesh_sharding(axes, mesh, rules)
    target = jax.tree_util.tree_map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract, shardings)
    return policy_lib.load_init_params(run_dir, target, config=lm.config, what=run_dir)


def _to_host(tree):
  """`tree`'s arrays as numpy on this process, whole even when they span other processes.

  NOTE: an output sharded over several processes cannot be fetched with
  device_get; it is gathered (a collective: every process calls this alike).
  """
  from jax.experimental import multihost_utils

  def fetch(a):
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(a, tiled=True))
    return np.asarray(jax.device_get(a))
  return jax.tree_util.tree_map(fetch, tree)


def _sample_ids(seeds, n):
  return (seeds[:, None] * n + jnp.arange(n)[None, :]).reshape(-1)


@functools.lru_cache(maxsize=8)
def policy_fn(lm: LanguageModel, config: sampler.SamplingConfig, num_samples: int):
  """jit fn(policy_params, ref_params, inputs [B, Li], seeds [B], rng) -> SampleOutput.

  Rows are (prompt b, sample j) -> b * n + j; `kl` is to the reference.
  """
  def run(pol, ref, inputs, seeds, rng):
    comps = [dera.Component(lm, pol), dera.Component(lm, ref)]
    return dera.sample_mixture(comps, jnp.array([1.0, 0.0]), inputs, rng, config,
                               num_samples=num_samples, row_ids=_sample_ids(seeds, num_samples),
                               reference_index=1)
  return jax.jit(run)


@functools.lru_cache(maxsize=8)
def sweep_fn(lm: LanguageModel, config: sampler.SamplingConfig, num_samples: int):
  """jit fn(ref_params, aligned_params, inputs, seeds, lambdas [K], rng) -> SampleOutput.

  Rows are (prompt b, sample j, lambda k) -> (b * n + j) * K + k; `kl` is to the reference.
  """
  def run(ref, aligned, inputs, seeds, lambdas, rng):
    return dera.dera_sweep(dera.Component(lm, ref), dera.Component(lm, aligned), inputs, lambdas,
                           rng, config, seeds=seeds, num_samples=num_samples)
  return jax.jit(run)


def decode_rows(run, params: tuple, inputs: np.ndarray, *, num_samples: int,
                lambdas: Optional[Sequence[float]], batch_size: int, seed: int,
                reward, vocab, desc: str, mesh=None, rules=None, progress: bool = True) -> list:
  """Runs `run` over all prompts in fixed-size batches; one dict per sampled response.

  Args:
    run: `policy_fn(...)` (lambdas None) or `sweep_fn(...)` (lambdas given).
    params: the params arguments of `run` (policy, reference) or (reference, aligned).
    inputs: [N, Li] prompt ids.
    reward: a `rewards.base.Reward`, scored on the sampled tokens exactly as in training.
    vocab: for the response text.

  Returns:
    Rows {prompt_index, sample, lam, tokens, length (tokens, EOS not counted),
    reward, kl, log_ratio, response}, ordered by (prompt, sample, lambda).
  """
  from tqdm import tqdm
  n_prompts = inputs.shape[0]
  k = 1 if lambdas is None else len(lambdas)
  lam_arr = None if lambdas is None else jnp.asarray(lambdas, jnp.float32)
  rng = jax.random.PRNGKey(seed)
  multi = jax.process_count() > 1
  if multi:
    # NOTE: host (numpy) arguments, the same on every process: a jit over the
    # global mesh takes them as replicated, unlike one process's device arrays.
    rng = np.asarray(rng)
  reward_params = reward.params()
  rows = []
  bar = tqdm(total=n_prompts, desc=desc, unit="prompt", mininterval=1.0,
             disable=not progress or jax.process_index() != 0,  # NOTE: one bar, process 0's
             dynamic_ncols=True)
  for start in range(0, n_prompts, batch_size):
    idx = np.arange(start, min(start + batch_size, n_prompts))
    # NOTE: the last batch is filled up by repeating its first prompt, so one shape compiles.
    full = np.concatenate([idx, np.full(batch_size - idx.size, idx[0])])
    if multi:
      x, seeds = np.asarray(inputs[full]), np.asarray(full, np.int32)
      lams = None if lam_arr is None else np.asarray(lambdas, np.float32)
    else:
      x, seeds, lams = jnp.asarray(inputs[full]), jnp.asarray(full, jnp.int32), lam_arr
    args = (*params, x, seeds) + (() if lams is None else (lams,)) + (rng,)
    if mesh is not None:
      with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        out = run(*args)
    else:
      out = run(*args)
    if multi:
      out = _to_host(out)  # NOTE: scored below from the whole batch, on every process
    rep_inputs = jnp.repeat(x, num_samples * k, axis=0)
    scores = reward.score_tokens(reward_params, rep_inputs, out.tokens, out.lengths)
    counts = rewards_base.response_token_count(out.tokens, out.lengths)
    out, scores, counts = _to_host((out, scores, counts))
    ref_lp = out.model_logprobs[1 if lambdas is None else 0]
    for bi, p in enumerate(idx):
      for j in range(num_samples):
        for ki in range(k):
          r = (bi * num_samples + j) * k + ki
          length = int(out.lengths[r])
          toks = out.tokens[r, :length]
          rows.append({
              "prompt_index": int(p), "sample": j,
              "lam": None if lambdas is None else float(lambdas[ki]),
              "tokens": toks.tolist(), "length": int(counts[r]), "reward": float(scores[r]),
              "kl": float(np.sum(out.kl[r, :length])),
              "log_ratio": float(np.sum(out.logprobs[r, :length] - ref_lp[r, :length])),
              "response": vocab_lib.decode(vocab, rewards_base.strip_ids(toks))})
    bar.update(idx.size)
  bar.close()
  return rows

