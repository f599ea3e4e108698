r"""Decoding binary: DeRa, controlled decoding, Transfer Q* and ARGS from run directories.

  python -m realign_jax.decode --gin_file=configs/decode/dera_builtin_tiny.gin \
      --gin.REF_CHECKPOINT="'runs/sft'" --gin.ALIGNED_CHECKPOINT="'runs/ppo'" \
      --gin.LAMBDAS="[0.0, 0.5, 1.0, 2.0]" --gin.OUTPUT_FILE="'runs/dera.jsonl'"

`method` (gin: `decode.method`) picks the decoder, by name (its settings flat,
`decode.cd_beta = ...`) or as a method object of `decode_methods`
(`decode.method = @TokenwiseCD()`, `TokenwiseCD.beta = ...`):
  'dera'         (DeRa, default) DeRa lambda sweep, logit or weight mixing;
  'cd_token'     (TokenwiseCD) token-wise CD with a value model (VALUE_CHECKPOINT: output_head
                 'scalar' scores the top-k candidates, 'lm' is a Q-head over the vocabulary);
  'cd_block'     (BlockwiseCD) blockwise CD: K candidate blocks of M tokens, the best by V kept;
  'tq_direct'    (TransferQ) Transfer Q* with a baseline aligned to the target reward;
  'tq_indirect'  (TransferQ(indirect=True)) Transfer Q* with a baseline aligned to another
                 reward r_BL
                 (both: `TQConfig.alpha_convention` = 'paper', the default, samples
                 p exp(Q / alpha), alpha the KL weight; 'authors' scores
                 log p + alpha Q as the authors' code);
  'args'         (ARGS) ARGS: log p(z | s) + w r(x, [s, z]) over the top-k.
The rewards of TQ* and ARGS are a reward-model run directory
(`reward_checkpoint`) or a `Reward` bound by gin (`decode.reward = @LengthReward()`).
Configs: configs/decode/{dera,cd_token,cd_block,tq_direct,tq_indirect,args}_builtin_tiny.gin.

DeRa writes one JSON line per (prompt, sample, lambda): prompt, response, lam, seed,
row_seed, tokens, the per-token log-probs of the sampled distribution and of
each model, the exact sequence KL to the reference (sum over steps of the
full-vocabulary KL) and the sequence log-ratio estimate
sum_t log q(y_t) - log p_ref(y_t) (greedy rows: a point mass per step,
log q = 0 and KL = -sum_t log p_ref(y_t)). Several aligned models
(`decode.aligned_checkpoints` with `decode.lambda_vectors`, Appendix B of the
paper, configs/decode/dera_multi_builtin_tiny.gin) mix
sum_i lam_i h_i + (1 - sum_i lam_i) h_ref; their rows' `lam` is the weight
vector and `aligned_model_logprobs` holds one list per aligned model. The
other methods write one line per (prompt, sample) with the same fields plus
`method` and `setting` (see `decode_methods`). The file appears only when complete;
the binary then writes its operative gin config beside it (OUTPUT_FILE.config.gin).

Every method runs through one batch loop (`decode_batches`). On several hosts
each process decodes its share of the prompt batches (batch b on process
b % P) on its own devices; each round's outputs are gathered, so the rows are
those of a one-process run, and process 0 alone writes the file.

Special ids and chat models: the models' special ids (model.json's
special_tokens; an HF directory's tokenizer files) must be the vocabulary's
(`decode.vocab_path`) and the same for every model combined; the sampler stops
at that eos and pads with that pad. `decode.chat_template = True` renders
each prompt with the chat template of the tokenizer's tokenizer_config.json
(one user message, generation prompt appended; `data/chat.py`), and the rows'
`prompt` is the rendered text. configs/decode/chat_dera.gin is the Zephyr
recipe (docs/chat_recipe.md).
"""

from realign_jax import cli

cli.precheck(__name__)  # NOTE: before the heavy imports (see cli.py)

import dataclasses
import inspect
import logging
import time
from typing import Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from realign_jax import decode_methods as methods_lib
from realign_jax import gin_utils
from realign_jax import paths
from realign_jax.checkpoints import manager as ckpt_lib
from realign_jax.checkpoints import run_dir
from realign_jax.data import pipeline
from realign_jax.data import vocab as vocab_lib
from realign_jax.decoding import dera, sampler, transfer_q
from realign_jax.errors import UserError
from realign_jax.models.api import LanguageModel
from realign_jax.parallel import partitioning
from realign_jax.parallel.abstract import sharded_abstract
from realign_jax.rewards.base import Reward

# NOTE: the methods' names and helpers, as the studies and tests read them here.
MIXINGS, METHODS = methods_lib.MIXINGS, methods_lib.METHODS
reward_label = methods_lib.reward_label
check_same_tokens = methods_lib.check_same_tokens
block_kl_estimate = methods_lib.block_kl_estimate


def read_prompt_file(path: str) -> list:
  """JSONL with a non-empty string `prompt` per line."""
  if not paths.isfile(path):
    raise UserError(f"prompt file {path} not found")
  from realign_jax.data import jsonl
  prompts = []
  for i, row in jsonl.iter_json_lines(path):
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
  target = sharded_abstract(lm, mesh, rules)
  return dera.Component(lm, policy_lib.load_init_params(model_dir, target, config=config,
                                                        what="checkpoint"))


def encode_prompts(vocab, prompts: Sequence[str], input_length: int, *,
                   chat: bool = False) -> np.ndarray:
  """[N, input_length] ids (`pipeline.fit_prompts` with the vocabulary's special ids).

  Over-long prompts are truncated (kept: the beginning), with a warning; an
  over-long chat prompt is refused (its end is the generation prompt).
  """
  tokens = vocab_lib.special_tokens(vocab)
  ids = [vocab_lib.encode(vocab, p) for p in prompts]
  if chat:
    for i, x in enumerate(ids):
      if len(x) > input_length:
        raise UserError(f"prompt {i} is {len(x)} tokens after the chat template, more than "
                        f"decode.input_length={input_length}; raise input_length")
    return pipeline.fit_prompts(ids, input_length, tokens, add_bos=False)
  too_long = sum(len(x) > input_length - 1 for x in ids)
  if too_long:
    logging.warning("%d of %d prompts are longer than input_length - 1 = %d tokens and were "
                    "truncated to their first %d tokens", too_long, len(ids), input_length - 1,
                    input_length - 1)
  return pipeline.fit_prompts(ids, input_length, tokens)


def decode(*, ref_checkpoint: str, output_file: str,
           method: Union[str, methods_lib.DecodeMethod] = "dera",
           lambdas: Optional[Sequence[float]] = None,
           aligned_checkpoint: Optional[str] = None, mixing: str = "logits",
           aligned_checkpoints: Optional[Sequence[str]] = None,
           lambda_vectors: Optional[Sequence[Sequence[float]]] = None,
           value_checkpoint: Optional[str] = None,
           baseline_checkpoint: Optional[str] = None, reward: Optional[Reward] = None,
           reward_checkpoint: Optional[str] = None, baseline_reward: Optional[Reward] = None,
           baseline_reward_checkpoint: Optional[str] = None, cd_beta: float = 1.0,
           cd_top_k: int = 10, block_candidates: int = 4, block_length: int = 4,
           tq: transfer_q.TQConfig = transfer_q.TQConfig(), args_top_k: int = 10,
           args_weight: float = 1.0,
           task: str = "builtin_summarize", split: str = "validation",
           prompt_file: Optional[str] = None, data_dir: Optional[str] = None,
           vocab_path: Optional[str] = None, max_prompts: Optional[int] = 64,
           input_length: int = 96, batch_size: int = 8, num_samples: int = 1,
           sampling: sampler.SamplingConfig = sampler.SamplingConfig(), seed: int = 0,
           progress: bool = True, allow_vocabulary_mismatch: bool = False,
           chat_template: bool = False) -> dict:
  """Decodes every prompt with `method` (at every lambda for DeRa); returns a summary dict.

  `method` is a method object (`decode_methods`: DeRa, TokenwiseCD,
  BlockwiseCD, TransferQ, ARGS; gin: `decode.method = @TokenwiseCD()`) or its
  name with the method's settings given flat here (each read only by its method):
    dera: `lambdas` (default [1.0]) with one `aligned_checkpoint` (or none: the
      reference alone), mixing 'logits' or 'weights'; or, for several aligned
      models (Appendix B of the paper), `aligned_checkpoints` [M] with
      `lambda_vectors` [K][M] (one weight per aligned model): row k samples
      softmax(sum_i lam_ki h_i + (1 - sum_i lam_ki) h_ref), all K in one
      batched call (logit mixing only).
    cd_token: value_checkpoint, cd_beta (beta of pi ~ p exp(V / beta)), cd_top_k
      (candidates per step; 0 = the whole vocabulary, Q-head value models only).
    cd_block: value_checkpoint, block_candidates (K), block_length (M).
    tq_direct / tq_indirect: baseline_checkpoint, `tq` (TQConfig; its `mode` is
      set by the method; `alpha_convention` 'paper' (default): alpha is the KL
      weight, p exp(Q / alpha), larger = closer to p; 'authors': log p + alpha Q
      as the authors' code, larger = further), the target reward (reward or
      reward_checkpoint) and, for indirect, the baseline's reward
      (baseline_reward or baseline_reward_checkpoint), which must be a different reward.
    args: args_top_k, args_weight and the reward.
  `sampling` decodes (temperature / greedy; KL is exact for the sampled
  distribution; blockwise CD draws its blocks with it); its eos and pad ids
  are the models' (leave them unset).
  `chat_template`: render each prompt with the vocabulary's chat template
  (tokenizer_config.json beside `vocab_path`) as one user message.
  """
  # NOTE: gin passes values on as written (batch_size='8'): types first.
  from realign_jax import config_check
  flat = {k: v for k, v in locals().items() if k in _FLAT_SETTINGS}
  config_check.check_args(decode, dict(locals()))
  if isinstance(method, methods_lib.DecodeMethod):
    changed = [k for k, v in flat.items() if not _is_default(k, v)]
    if changed:
      raise UserError(f"decode.{changed[0]} is a setting of the flat form (decode.method = "
                      f"'name'); with decode.method = {type(method).__name__}(...) give it to "
                      f"the method object")
  elif not isinstance(method, str) or method not in METHODS:
    raise UserError(f"decode method must be one of {METHODS}, got {method!r}")
  # NOTE: a model decoded with another vocabulary than its own is garbage that
  # looks like output; model.json records the one each run was trained with.
  if isinstance(method, str):
    named = [("aligned_checkpoint", aligned_checkpoint),
             *(("aligned_checkpoints", c) for c in aligned_checkpoints or ()),
             ("value_checkpoint", value_checkpoint), ("baseline_checkpoint", baseline_checkpoint),
             ("reward_checkpoint", reward_checkpoint),
             ("baseline_reward_checkpoint", baseline_reward_checkpoint)]
  else:
    named = [(f"{type(method).__name__}.{f.name}", c) for f in dataclasses.fields(method)
             if f.name.endswith("checkpoint") or f.name.endswith("checkpoints")
             for c in (getattr(method, f.name) if isinstance(getattr(method, f.name), (list, tuple))
                       else [getattr(method, f.name)])]
  for name, ckpt in (("ref_checkpoint", ref_checkpoint), *named):
    if ckpt:
      run_dir.check_vocabulary(ckpt, run_dir.recorded_vocabulary(ckpt), vocab_path,
                               allow_other=allow_vocabulary_mismatch, where=name)
  if isinstance(method, str):
    method = methods_lib.from_settings(method, **flat)
  return run(method, ref_checkpoint=ref_checkpoint, output_file=output_file, task=task,
             split=split, prompt_file=prompt_file, data_dir=data_dir, vocab_path=vocab_path,
             max_prompts=max_prompts, input_length=input_length, batch_size=batch_size,
             num_samples=num_samples, sampling=sampling, seed=seed, progress=progress,
             chat_template=chat_template)


# The method settings of decode's flat form, read by `decode_methods.from_settings`.
_FLAT_SETTINGS = ("lambdas", "aligned_checkpoint", "mixing", "aligned_checkpoints",
                  "lambda_vectors", "value_checkpoint", "baseline_checkpoint", "reward",
                  "reward_checkpoint", "baseline_reward", "baseline_reward_checkpoint", "cd_beta",
                  "cd_top_k", "block_candidates", "block_length", "tq", "args_top_k",
                  "args_weight")


def _is_default(name: str, value) -> bool:
  default = inspect.signature(decode).parameters[name].default
  return value is default or (type(value) is type(default) and value == default)


def run(method: methods_lib.DecodeMethod, *, ref_checkpoint: str, output_file: str,
        task: str = "builtin_summarize", split: str = "validation",
        prompt_file: Optional[str] = None, data_dir: Optional[str] = None,
        vocab_path: Optional[str] = None, max_prompts: Optional[int] = 64,
        input_length: int = 96, batch_size: int = 8, num_samples: int = 1,
        sampling: sampler.SamplingConfig = sampler.SamplingConfig(), seed: int = 0,
        progress: bool = True, chat_template: bool = False) -> dict:
  """Validate, load, probe the rewards, decode in the one batch loop, write; the summary."""
  # ---- validate everything before any compute --------------------------------
  _check_common(num_samples, batch_size, output_file)
  ref_cfg, _ = ckpt_lib.read_model_json(ref_checkpoint)
  method.check(methods_lib.Context(ref_checkpoint, ref_cfg, vocab_path, input_length, sampling))
  vocab, prompts, inputs = load_prompts(ref_cfg, vocab_path, prompt_file, task, split, data_dir,
                                        max_prompts, input_length, chat_template=chat_template,
                                        ref_checkpoint=ref_checkpoint)

  mesh = host_mesh()
  rules = partitioning.logical_axis_rules()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    comps = {"ref": load_component(ref_checkpoint, mesh, rules)}
    for name, (model_dir, kind) in method.components().items():
      load = load_value_model if kind == "value" else load_component
      comps[name] = load(model_dir, mesh, rules)
    rewards = method.rewards()
    for key, r in rewards.items():
      r.setup(mesh, rules)
      # a reward that is NaN on a probe is refused before any decoding
      probe = jax.jit(lambda p, x, y, n, r=r: r.score_tokens(p, x, y, n))
      transfer_q.check_reward_finite(
          lambda x, y, n, p=r.params(), probe=probe: probe(p, x, y, n),
          jnp.asarray(inputs[:batch_size]), what=f"{key} {reward_label(r)}",
          tokens=ref_cfg.tokens)
    runners = method.runners(comps, rewards, sampling, num_samples)
    rows, timing = decode_batches(method, runners, inputs, prompts, vocab, n=num_samples,
                                  batch_size=batch_size, seed=seed, sampling=sampling,
                                  progress=progress)
  write_rows(rows, output_file)
  return {"rows": len(rows), "prompts": len(prompts), **method.summary(rows),
          "output_file": output_file, **timing}


def decode_batches(method: methods_lib.DecodeMethod, runners: Sequence, inputs, prompts, vocab,
                   *, n: int, batch_size: int, seed: int, sampling: sampler.SamplingConfig,
                   progress: bool = True) -> tuple:
  """THE batch loop: fixed-size batches (one compiled program per runner); (rows, timing).

  On several processes batch b is decoded by process b % P (round r holds
  batches r * P ... r * P + P - 1) on its own devices, and each round's
  outputs (fixed-size arrays) are gathered to every process, so rows come out
  in prompt order on each; process 0 alone writes them. A row depends only on
  its prompt's index (row seed prompt * n + j), not on the process that drew it.
  """
  from tqdm import tqdm
  from realign_jax.parallel import multihost
  rng = jax.random.PRNGKey(seed)
  num = inputs.shape[0]
  starts = list(range(0, num, batch_size))
  procs, me = multihost.process_slot()
  compiled = [None] * len(runners)
  rows, extra = [], {}
  compile_s, decode_s, total_tokens, here = 0.0, 0.0, 0, 0
  bar = tqdm(total=num, desc=f"decode {method.name}", unit="prompt", mininterval=1.0,
             disable=not progress or me != 0)
  for first in range(0, len(starts), procs):
    b = first + me
    start = starts[min(b, len(starts) - 1)]
    idx = np.arange(start, min(start + batch_size, num))
    pad = batch_size - len(idx)
    batch_idx = np.concatenate([idx, np.full(pad, idx[0])]) if pad else idx
    x, seeds = jnp.asarray(inputs[batch_idx]), jnp.asarray(batch_idx, jnp.int32)
    outs, seconds = [], 0.0
    for i, r in enumerate(runners):
      args = (*r.args, x, seeds, rng)
      if b >= len(starts):
        # NOTE: no batch left for this process in the last round: zeros of the
        # outputs' shapes stand in for the gather, nothing is decoded.
        outs.append(jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype),
                                           jax.eval_shape(r.fn, *args)))
        continue
      if compiled[i] is None:
        # NOTE: compiled ahead of time so tokens/s and the per-block latency
        # measure decoding, not compilation.
        t0 = time.perf_counter()
        compiled[i] = r.fn.lower(*args).compile()
        compile_s += time.perf_counter() - t0
      t0 = time.perf_counter()
      outs.append(jax.device_get(compiled[i](*args)))
      seconds += time.perf_counter() - t0
    here += len(idx) if b < len(starts) else 0
    decode_s += seconds
    batches = [methods_lib.Batch(idx, outs, seconds)]
    if procs > 1:
      batches = _gather_round(outs, seconds, first, starts, batch_size, num)
    for batch in batches:
      method.check_batch(batch, prompts, n)
      batch_rows = method.rows(batch, prompts, vocab, n, seed, sampling)
      total_tokens += sum(r["length"] for r in batch_rows)
      rows.extend(batch_rows)
      for k, v in method.describe_batch(batch).items():
        extra[k] = extra.get(k, 0) + v
      bar.update(len(batch.idx))
    bar.set_postfix(tok_s=f"{total_tokens / max(decode_s, 1e-9):.0f}")
  bar.close()
  if procs > 1:
    decode_s = float(np.max(multihost.gather(np.float32(decode_s))))
  timing = {"compile_s": compile_s, "decode_s": decode_s, "tokens": total_tokens,
            "tokens_per_s": total_tokens / max(decode_s, 1e-9), "prompts_here": here}
  if "block_rounds" in extra:
    timing["block_rounds"] = extra["block_rounds"]
    timing["block_latency_s"] = decode_s / max(extra["block_rounds"], 1)
  return rows, timing


def _gather_round(outs, seconds, first, starts, batch_size, num) -> list:
  """Every process's batch of the round starting at batch `first`, in batch order."""
  from realign_jax.parallel import multihost
  gathered = multihost.gather({"outs": outs, "seconds": np.float32(seconds)})
  batches = []
  for q in range(multihost.process_slot()[0]):
    b = first + q
    if b >= len(starts):
      break
    idx = np.arange(starts[b], min(starts[b] + batch_size, num))
    outs_q = jax.tree_util.tree_map(lambda a, q=q: np.asarray(a[q]), gathered["outs"])
    batches.append(methods_lib.Batch(idx, outs_q, float(gathered["seconds"][q])))
  return batches


def _check_common(num_samples: int, batch_size: int, output_file: str) -> None:
  if num_samples < 1:
    raise UserError(f"num_samples must be >= 1, got {num_samples}")
  if batch_size < 1:
    raise UserError(f"batch_size must be >= 1, got {batch_size}")
  from realign_jax import config_check
  config_check.check_output_file(output_file)


def load_prompts(ref_cfg, vocab_path, prompt_file, task, split, data_dir, max_prompts,
                 input_length, *, chat_template: bool = False, ref_checkpoint: str = ""):
  """(vocab, prompts, inputs [N, input_length]) with the vocabulary checked against the model.

  With `chat_template` the prompts are the rendered chat texts.
  """
  if not isinstance(chat_template, bool):
    raise UserError(f"decode.chat_template must be True or False, got {chat_template!r}")
  if chat_template:
    from realign_jax.data import chat
    chat.load_template(vocab_path)  # NOTE: a missing template is refused before any reading
  vocab = vocab_lib.load_vocabulary(vocab_path)
  vocab_lib.check_model_tokens(vocab, ref_cfg, f"the model {ref_checkpoint}".rstrip())
  if prompt_file:
    prompts = read_prompt_file(prompt_file)
  else:
    prompts = [e["inputs"] for e in pipeline.text_examples(task, split, data_dir=data_dir)]
    if not prompts:
      raise UserError(f"task {task} split {split} holds no examples")
  if max_prompts:
    prompts = prompts[:max_prompts]
  if chat_template:
    from realign_jax.data import chat
    prompts = chat.render_prompts(vocab_path, prompts)
  return vocab, prompts, encode_prompts(vocab, prompts, input_length, chat=chat_template)


def write_rows(rows: Sequence[dict], output_file: str) -> None:
  """JSON lines; the file appears only complete, written by process 0 alone."""
  if jax.process_index() == 0:
    ckpt_lib.atomic_write_jsonl(output_file, rows)


def host_mesh():
  """The mesh decoding runs on: all devices on one host, this host's own on several.

  NOTE: on several hosts each process decodes its own batches on its own
  devices (no cross-host collective inside a program; `decode_batches` gathers
  the outputs between batches) and process 0 alone writes the rows.
  """
  if jax.process_count() == 1:
    return partitioning.create_mesh()
  return partitioning.create_mesh(devices=jax.local_devices())



def load_value_model(model_dir: str, mesh, rules) -> dera.Component:
  """A value model run directory (configs/value/) as a sharded Component.

  Its model.json's output_head decides the kind: 'scalar' (or 'lm+scalar') is
  V([s, z]) per prefix, 'lm' a Q-head whose logits are Q(s)[z].
  """
  config, head = ckpt_lib.read_model_json(model_dir)
  lm = LanguageModel(config, head)
  return dera.Component(lm, ckpt_lib.load_params(model_dir, sharded_abstract(lm, mesh, rules)))


def main(argv: list) -> int:
  summary = gin_utils.call(gin_utils.configure_binary(
      argv, "decode", decode, extra=[(sampler.SamplingConfig, "SamplingConfig"),
                                     *((c, c.__name__) for c in methods_lib.CONFIGURABLES)]))
  gin_utils.write_operative_config_beside(summary["output_file"])
  if jax.process_count() > 1:
    print(f"process {jax.process_index()} of {jax.process_count()} decoded "
          f"{summary['prompts_here']} of {summary['prompts']} prompts")
  if "lambdas" in summary:
    print(f"wrote {summary['rows']} rows ({summary['prompts']} prompts x lambdas "
          f"{summary['lambdas']}) to {summary['output_file']}; mean KL to the reference "
          f"{summary['mean_kl']:.4f} nats")
    return 0
  if summary["kl_kind"] == "bound":
    to = ("the reference" if summary.get("kl_to", "p") == "p" else
          "the proposal (the reference after temperature / top-k / top-p)")
    kl = (f"KL to {to} <= {summary['mean_kl_bound']:.4f} nats (best-of-K bound per "
          f"block), estimated {summary['mean_kl_estimate']:.4f} nats (best-of-K estimator per "
          f"block); per-block latency {summary['block_latency_s'] * 1e3:.1f} ms")
  else:
    kl = f"mean KL to the reference {summary['mean_kl']:.4f} nats (exact)"
  print(f"wrote {summary['rows']} rows ({summary['prompts']} prompts, method "
        f"{summary['method']} {summary['setting']}) to {summary['output_file']}; {kl}; "
        f"{summary['tokens_per_s']:.0f} tokens/s (compile {summary['compile_s']:.1f} s)")
  return 0


if __name__ == "__main__":
  gin_utils.run_main(main)
