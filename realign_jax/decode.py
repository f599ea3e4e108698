r"""Decoding binary: DeRa lambda sweeps (logit or weight mixing) from run directories.

  python -m realign_jax.decode --gin_file=configs/decode/dera_builtin_tiny.gin \
      --gin.REF_CHECKPOINT="'/tmp/sft'" --gin.ALIGNED_CHECKPOINT="'/tmp/ppo'" \
      --gin.LAMBDAS="[0.0, 0.5, 1.0, 2.0]" --gin.OUTPUT_FILE="'/tmp/dera.jsonl'"

Writes one JSON line per (prompt, sample, lambda): prompt, response, lam, seed,
row_seed, tokens, the per-token log-probs of the sampled distribution and of
each model, the exact sequence KL to the reference (sum over steps of the
full-vocabulary KL) and the sequence log-ratio estimate
sum_t log q(y_t) - log p_ref(y_t). The file appears only when complete.
"""

import json
import logging
import os
import time
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from realign_jax import gin_utils
from realign_jax.checkpoints import manager as ckpt_lib
from realign_jax.data import pipeline
from realign_jax.data import vocab as vocab_lib
from realign_jax.decoding import dera, sampler
from realign_jax.errors import UserError
from realign_jax.models.api import LanguageModel
from realign_jax.parallel import partitioning

MIXINGS = ("logits", "weights")


def read_prompt_file(path: str) -> list:
  """JSONL with a non-empty string `prompt` per line."""
  if not os.path.isfile(path):
    raise UserError(f"prompt file {path} not found")
  prompts = []
  with open(path) as f:
    for i, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except ValueError as e:
        raise UserError(f"{path} row {i}: not valid JSON ({e})") from e
      p = row.get("prompt") if isinstance(row, dict) else None
      if not isinstance(p, str) or not p.strip():
        raise UserError(f"{path} row {i}: missing or empty 'prompt' field")
      prompts.append(p)
  if not prompts:
    raise UserError(f"prompt file {path} holds no prompts")
  return prompts


def load_component(model_dir: str, mesh, rules) -> dera.Component:
  """Rebuilds the language model from model.json and loads its latest params, sharded.

  A policy trained with a value head (PPO's "lm+scalar") loads as its
  language model alone: decoding needs only the logits.
  """
  from realign_jax.training import policy as policy_lib
  config, _ = ckpt_lib.read_model_json(model_dir)
  lm = LanguageModel(config)
  abstract, axes = lm.abstract_init()
  shardings = partitioning.logical_to_mesh_sharding(axes, mesh, rules)
  target = jax.tree_util.tree_map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract, shardings)
  return dera.Component(lm, policy_lib.load_init_params(model_dir, target, config=config,
                                                        what="checkpoint"))


def encode_prompts(vocab, prompts: Sequence[str], input_length: int) -> np.ndarray:
  """[N, input_length] ids; over-long prompts are truncated (kept: the beginning), with a warning."""
  ids = [vocab_lib.encode(vocab, p) for p in prompts]
  too_long = sum(len(x) > input_length - 1 for x in ids)
  if too_long:
    logging.warning("%d of %d prompts are longer than input_length - 1 = %d tokens and were "
                    "truncated to their first %d tokens", too_long, len(ids), input_length - 1,
                    input_length - 1)
  return pipeline.fit(ids, input_length)


def decode(*, ref_checkpoint: str, output_file: str, lambdas: Sequence[float] = (1.0,),
           aligned_checkpoint: Optional[str] = None, mixing: str = "logits",
           task: str = "builtin_summarize", split: str = "validation",
           prompt_file: Optional[str] = None, data_dir: Optional[str] = None,
           vocab_path: Optional[str] = None, max_prompts: Optional[int] = 64,
           input_length: int = 96, batch_size: int = 8, num_samples: int = 1,
           sampling: sampler.SamplingConfig = sampler.SamplingConfig(), seed: int = 0,
           progress: bool = True) -> dict:
  """Decodes every prompt at every lambda; returns a summary dict."""
  # ---- validate everything before any compute --------------------------------
  lambdas = dera.check_lambdas(lambdas)
  if len(set(lambdas)) != len(lambdas):
    raise UserError(f"the lambda list has duplicates: {lambdas}")
  if mixing not in MIXINGS:
    raise UserError(f"mixing must be one of {MIXINGS}, got {mixing!r}")
  if num_samples < 1:
    raise UserError(f"num_samples must be >= 1, got {num_samples}")
  if batch_size < 1:
    raise UserError(f"batch_size must be >= 1, got {batch_size}")
  out_dir = os.path.dirname(os.path.abspath(output_file))
  if not os.path.isdir(out_dir):
    raise UserError(f"output directory {out_dir} does not exist")
  ref_cfg, _ = ckpt_lib.read_model_json(ref_checkpoint)
  al_cfg = None
  if aligned_checkpoint:
    al_cfg, _ = ckpt_lib.read_model_json(aligned_checkpoint)
    if al_cfg.vocab_size != ref_cfg.vocab_size:
      raise UserError(f"reference and aligned models have different vocabulary sizes: "
                      f"{ref_cfg.vocab_size} ({ref_checkpoint}) vs {al_cfg.vocab_size} "
                      f"({aligned_checkpoint})")
  vocab = vocab_lib.load_vocabulary(vocab_path)
  if vocab.vocab_size > ref_cfg.vocab_size:
    raise UserError(f"vocabulary {vocab_path or 'built-in'} has {vocab.vocab_size} ids, more than "
                    f"the models' vocab_size {ref_cfg.vocab_size}")
  if prompt_file:
    prompts = read_prompt_file(prompt_file)
  else:
    prompts = [e["inputs"] for e in pipeline.text_examples(task, split, data_dir=data_dir)]
    if not prompts:
      raise UserError(f"task {task} split {split} holds no examples")
  if max_prompts:
    prompts = prompts[:max_prompts]
  inputs = encode_prompts(vocab, prompts, input_length)

  mesh = partitioning.create_mesh()
  rules = partitioning.logical_axis_rules()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    ref = load_component(ref_checkpoint, mesh, rules)
    aligned = load_component(aligned_checkpoint, mesh, rules) if aligned_checkpoint else None
    if mixing == "weights" and aligned is not None:
      dera.check_same_architecture(aligned.params, ref.params)
    run = _make_runner(ref, aligned, lambdas, mixing, sampling, num_samples)
    rows = _decode_all(run, inputs, prompts, vocab, lambdas, num_samples, batch_size, seed,
                       mixing, aligned is not None, progress)
  tmp = f"{output_file}.tmp-{os.getpid()}"
  try:
    with open(tmp, "w") as f:
      for r in rows:
        f.write(json.dumps(r) + "\n")
    os.replace(tmp, output_file)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  kl = np.array([r["kl"] for r in rows])
  return {"rows": len(rows), "prompts": len(prompts), "lambdas": lambdas,
          "mean_kl": float(kl.mean()), "output_file": output_file}


def _make_runner(ref, aligned, lambdas, mixing, cfg, n):
  """Returns jitted run(inputs, seeds, rng) -> SampleOutput with rows (b, j, k)."""
  if aligned is None:
    def run(inputs, seeds, rng):
      sample_ids = (seeds[:, None] * n + jnp.arange(n)[None]).reshape(-1)
      return dera.sample_mixture([ref], jnp.ones((1,)), inputs, rng, cfg, num_samples=n,
                                 row_ids=sample_ids, reference_index=0)
    return [(None, jax.jit(run))]
  if mixing == "logits":
    lam = jnp.asarray(lambdas, jnp.float32)
    return [(None, jax.jit(lambda x, s, r: dera.dera_sweep(ref, aligned, x, lam, r, cfg, seeds=s,
                                                           num_samples=n)))]
  # Weight mixing: one model per lambda; the reference and aligned models ride
  # along with weight 0 so each token's log-probs and the KL come out of the same loop.
  runners = []
  for lam in lambdas:
    mixed = dera.Component(ref.lm, dera.mix_weights(aligned.params, ref.params, lam))

    def run(inputs, seeds, rng, mixed=mixed):
      sample_ids = (seeds[:, None] * n + jnp.arange(n)[None]).reshape(-1)
      return dera.sample_mixture([mixed, ref, aligned], jnp.array([1.0, 0.0, 0.0]), inputs, rng,
                                 cfg, num_samples=n, row_ids=sample_ids, reference_index=1)
    runners.append((lam, jax.jit(run)))
  return runners


def _decode_all(runners, inputs, prompts, vocab, lambdas, n, batch_size, seed, mixing,
                has_aligned, progress):
  from tqdm import tqdm
  rng = jax.random.PRNGKey(seed)
  num = inputs.shape[0]
  rows = [None] * (num * n * len(lambdas if has_aligned else [0]))
  total_tokens, t0 = 0, time.perf_counter()
  bar = tqdm(total=num, desc="decode", unit="prompt", disable=not progress, mininterval=1.0)
  for start in range(0, num, batch_size):
    idx = np.arange(start, min(start + batch_size, num))
    pad = batch_size - len(idx)
    batch_idx = np.concatenate([idx, np.full(pad, idx[0])]) if pad else idx
    x = jnp.asarray(inputs[batch_idx])
    seeds = jnp.asarray(batch_idx, jnp.int32)
    for lam_fixed, run in runners:
      out = jax.device_get(run(x, seeds, rng))
      lam_list = lambdas if lam_fixed is None and has_aligned else [lam_fixed]
      kk = len(lam_list)
      for bi, p_idx in enumerate(idx):
        for j in range(n):
          for ki, lam in enumerate(lam_list):
            r = (bi * n + j) * kk + ki
            length = int(out.lengths[r])
            total_tokens += length
            lp = out.logprobs[r, :length]
            comp = out.model_logprobs[:, r, :length]
            ref_lp = comp[0] if mixing == "logits" or not has_aligned else comp[1]
            row = {
                "prompt": prompts[p_idx], "response": vocab_lib.decode(vocab, out.tokens[r].tolist()),
                "lam": None if lam is None else float(lam), "seed": seed,
                "row_seed": int(p_idx * n + j), "prompt_index": int(p_idx), "sample": j,
                "mixing": mixing if has_aligned else "none",
                "tokens": out.tokens[r, :length].tolist(), "length": length,
                "logprobs": lp.tolist(), "ref_logprobs": ref_lp.tolist(),
                "kl": float(np.sum(out.kl[r, :length])),
                "log_ratio": float(np.sum(lp - ref_lp)),
            }
            if has_aligned:
              row["aligned_logprobs"] = (comp[1] if mixing == "logits" else comp[2]).tolist()
            lam_pos = 0 if lam is None else lambdas.index(lam)
            rows[(p_idx * n + j) * (len(lambdas) if has_aligned else 1) + lam_pos] = row
    bar.update(len(idx))
    bar.set_postfix(tok_s=f"{total_tokens / max(time.perf_counter() - t0, 1e-9):.0f}")
  bar.close()
  return rows


def main(argv: list) -> int:
  summary = gin_utils.call(gin_utils.configure_binary(
      argv, "decode", decode, extra=[(sampler.SamplingConfig, "SamplingConfig")]))
  print(f"wrote {summary['rows']} rows ({summary['prompts']} prompts x lambdas "
        f"{summary['lambdas']}) to {summary['output_file']}; mean KL to the reference "
        f"{summary['mean_kl']:.4f} nats")
  return 0


if __name__ == "__main__":
  gin_utils.run_main(main)
