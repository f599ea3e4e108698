"""THE batch loop every decoder runs through, its host split, and the rows' single write.

On several hosts each process decodes its share of the prompt batches (batch
b on process b % P) on its own devices (`host_mesh`); each round's outputs are
gathered, so every process gets the rows of a one-process run, and process 0
alone writes them (`write_rows`). A row depends only on its prompt's index
(row seed prompt * n + j), not on the batch or the process that drew it.
"""

import contextlib
import time
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from realign_jax.checkpoints import manager as ckpt_lib
from realign_jax.decoding import sampler
from realign_jax.inference.method import Batch, DecodeMethod
from realign_jax.parallel import multihost, partitioning


def host_mesh():
  """The mesh decoding runs on: all devices on one host, this host's own on several.

  NOTE: on several hosts each process decodes its own batches on its own
  devices (no cross-host collective inside a program; `decode_batches` gathers
  the outputs between batches) and process 0 alone writes the rows.
  """
  if jax.process_count() == 1:
    return partitioning.create_mesh()
  return partitioning.create_mesh(devices=jax.local_devices())


def write_rows(rows: Sequence[dict], output_file: str) -> None:
  """JSON lines; the file appears only complete, written by process 0 alone."""
  if jax.process_index() == 0:
    ckpt_lib.atomic_write_jsonl(output_file, rows)


def decode_batches(method: DecodeMethod, runners: Sequence, inputs, prompts, vocab,
                   *, n: int, batch_size: int, seed: int, sampling: sampler.SamplingConfig,
                   progress: bool = True, desc: Optional[str] = None, mesh=None,
                   rules=None) -> tuple:
  """THE batch loop: fixed-size batches (one compiled program per runner); (rows, timing).

  Args:
    method: the decoding method (`method.DecodeMethod`); it makes the rows.
    runners: its `runners(...)`, each `fn(*args, inputs, seeds, rng)`.
    inputs: [N, input_length] prompt ids.
    prompts: the N prompt texts (the rows' `prompt`; None when the method needs none).
    vocab: for the rows' text.
    n: samples per prompt.
    batch_size: prompts per batch (the last batch is filled up by repeating its first prompt).
    seed: the sampling seed.
    sampling: the sampler settings.
    progress: a progress bar (process 0's).
    desc: the bar's label (default: the method's name).
    mesh, rules: the mesh and logical-axis rules the runners are compiled and run
      under (None: the caller's).

  On several processes batch b is decoded by process b % P (round r holds
  batches r * P ... r * P + P - 1) on its own devices, and each round's
  outputs (fixed-size arrays) are gathered to every process, so rows come out
  in prompt order on each.
  """
  rng = jax.random.PRNGKey(seed)
  num = inputs.shape[0]
  starts = list(range(0, num, batch_size))
  procs, me = multihost.process_slot()
  compiled = [None] * len(runners)
  rows, extra = [], {}
  timing = {"compile_s": 0.0, "decode_s": 0.0, "tokens": 0}
  here = 0
  bar = tqdm(total=num, desc=desc or f"decode {method.name}", unit="prompt", mininterval=1.0,
             disable=not progress or me != 0)
  for first in range(0, len(starts), procs):
    b = first + me
    start = starts[min(b, len(starts) - 1)]
    idx = np.arange(start, min(start + batch_size, num))
    pad = batch_size - len(idx)
    batch_idx = np.concatenate([idx, np.full(pad, idx[0])]) if pad else idx
    x, seeds = jnp.asarray(inputs[batch_idx]), jnp.asarray(batch_idx, jnp.int32)
    args = [(*r.args, x, seeds, rng) for r in runners]
    if b < len(starts):
      outs, seconds = _decode_batch(method, runners, args, compiled, x, timing, mesh, rules)
      here += len(idx)
    else:
      # NOTE: no batch left for this process in the last round: zeros of the
      # outputs' shapes stand in for the gather, nothing is decoded.
      outs, seconds = _no_batch(method, runners, args, x, mesh, rules), 0.0
    timing["decode_s"] += seconds
    batches = [Batch(idx, outs, seconds)]
    if procs > 1:
      batches = _gather_round(outs, seconds, first, starts, batch_size, num)
    for batch in batches:
      method.check_batch(batch, prompts, n)
      batch_rows = method.rows(batch, prompts, vocab, n, seed, sampling)
      timing["tokens"] += sum(r["length"] for r in batch_rows)
      rows.extend(batch_rows)
      for k, v in method.describe_batch(batch).items():
        extra[k] = extra.get(k, 0) + v
      bar.update(len(batch.idx))
    bar.set_postfix(tok_s=f"{timing['tokens'] / max(timing['decode_s'], 1e-9):.0f}")
  bar.close()
  if procs > 1:
    timing["decode_s"] = float(np.max(multihost.gather(np.float32(timing["decode_s"]))))
  timing.update(tokens_per_s=timing["tokens"] / max(timing["decode_s"], 1e-9), prompts_here=here)
  if "block_rounds" in extra:
    timing["block_rounds"] = extra["block_rounds"]
    timing["block_latency_s"] = timing["decode_s"] / max(extra["block_rounds"], 1)
  return rows, timing


def sample(method: DecodeMethod, inputs, vocab, *, num_samples: int, batch_size: int,
           seed: int, sampling: sampler.SamplingConfig, mesh, rules, prompts=None,
           progress: bool = True, desc: Optional[str] = None) -> list:
  """The rows of a method whose params are in hand (`PolicySampling`), through the one loop.

  `mesh` is where its params live (`host_mesh()`: on several hosts each
  process decodes its own batches); every process gets every row.
  """
  runners = method.runners({}, {}, sampling, num_samples)
  rows, _ = decode_batches(method, runners, inputs, prompts, vocab, n=num_samples,
                           batch_size=batch_size, seed=seed, sampling=sampling,
                           progress=progress, desc=desc, mesh=mesh, rules=rules)
  return rows


def _context(mesh, rules):
  if mesh is None:
    return contextlib.nullcontext()
  stack = contextlib.ExitStack()
  stack.enter_context(jax.set_mesh(mesh))
  stack.enter_context(nn.logical_axis_rules(rules))
  return stack


def _decode_batch(method, runners, args, compiled, x, timing, mesh, rules) -> tuple:
  """(host outputs, decoding seconds) of one batch; compiles each runner once, ahead of time."""
  with _context(mesh, rules):
    for i, r in enumerate(runners):
      if compiled[i] is None:
        # NOTE: compiled ahead of time so tokens/s and the per-block latency
        # measure decoding, not compilation.
        t0 = time.perf_counter()
        compiled[i] = r.fn.lower(*args[i]).compile()
        timing["compile_s"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    outs = [compiled[i](*a) for i, a in enumerate(args)]
  outs = jax.device_get(method.device_outputs(outs, x))
  return outs, time.perf_counter() - t0


def _no_batch(method, runners, args, x, mesh, rules) -> list:
  """Zeros of the shapes of `method.device_outputs` of the runners' outputs."""
  with _context(mesh, rules):
    shapes = [jax.eval_shape(r.fn, *a) for r, a in zip(runners, args)]
  shapes = jax.eval_shape(lambda x, *o: method.device_outputs(list(o), x), x, *shapes)
  return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def _gather_round(outs, seconds, first, starts, batch_size, num) -> list:
  """Every process's batch of the round starting at batch `first`, in batch order."""
  gathered = multihost.gather({"outs": outs, "seconds": np.float32(seconds)})
  batches = []
  for q in range(multihost.process_slot()[0]):
    b = first + q
    if b >= len(starts):
      break
    idx = np.arange(starts[b], min(starts[b] + batch_size, num))
    outs_q = jax.tree_util.tree_map(lambda a, q=q: np.asarray(a[q]), gathered["outs"])
    batches.append(Batch(idx, outs_q, float(gathered["seconds"][q])))
  return batches
