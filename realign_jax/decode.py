r"""Decoding binary: DeRa, controlled decoding, Transfer Q* and ARGS from run directories.

  python -m realign_jax.decode --gin_file=configs/decode/dera_builtin_tiny.gin \
      --gin.REF_CHECKPOINT="'runs/sft'" --gin.ALIGNED_CHECKPOINT="'runs/ppo'" \
      --gin.LAMBDAS="[0.0, 0.5, 1.0, 2.0]" --gin.OUTPUT_FILE="'runs/dera.jsonl'"

`method` (gin: `decode.method`) picks the decoder:
  'dera'         (default) DeRa lambda sweep, logit or weight mixing;
  'cd_token'     token-wise CD with a value model (VALUE_CHECKPOINT: output_head
                 'scalar' scores the top-k candidates, 'lm' is a Q-head over the vocabulary);
  'cd_block'     blockwise CD: K candidate blocks of M tokens, the best by V kept;
  'tq_direct'    Transfer Q* with a baseline aligned to the target reward;
  'tq_indirect'  Transfer Q* with a baseline aligned to another reward r_BL
                 (both: `TQConfig.alpha_convention` = 'paper', the default, samples
                 p exp(Q / alpha), alpha the KL weight; 'authors' scores
                 log p + alpha Q as the authors' code);
  'args'         ARGS: log p(z | s) + w r(x, [s, z]) over the top-k.
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
`method` and `setting` (see `_decode_method_all`). The file appears only when complete;
the binary then writes its operative gin config beside it (OUTPUT_FILE.config.gin).

On several hosts every process decodes every prompt on its own devices and
process 0 alone writes the file (see `host_mesh`).

Special ids and chat models: the models' special ids (model.json's
special_tokens; an HF directory's tokenizer files) must be the vocabulary's
(`decode.vocab_path`) and the same for every model combined; the sampler stops
at that eos and pads with that pad. `decode.chat_template = True` renders
each prompt with the chat template of the tokenizer's tokenizer_config.json
(one user message, generation prompt appended; `data/chat.py`), and the rows'
`prompt` is the rendered text. configs/decode/chat_dera.gin is the Zephyr
recipe (docs/chat_recipe.md).
"""

from realign_jax import startup

startup.precheck(__name__)  # NOTE: before the heavy imports (see startup.py)

import dataclasses
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
from realign_jax.checkpoints import run_dir
from realign_jax.data import pipeline
from realign_jax.data import vocab as vocab_lib
from realign_jax.decoding import controlled, dera, sampler, transfer_q
from realign_jax.errors import UserError
from realign_jax.models.api import LanguageModel
from realign_jax.parallel import partitioning
from realign_jax.rewards.base import Reward

MIXINGS = ("logits", "weights")
METHODS = ("dera", "cd_token", "cd_block", "tq_direct", "tq_indirect", "args")


def read_prompt_file(path: str) -> list:
  """JSONL with a non-empty string `prompt` per line."""
  if not os.path.isfile(path):
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
  abstract, axes = lm.abstract_init()
  shardings = partitioning.logical_to_mesh_sharding(axes, mesh, rules)
  target = jax.tree_util.tree_map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract, shardings)
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


def decode(*, ref_checkpoint: str, output_file: str, lambdas: Optional[Sequence[float]] = None,
           aligned_checkpoint: Optional[str] = None, mixing: str = "logits",
           aligned_checkpoints: Optional[Sequence[str]] = None,
           lambda_vectors: Optional[Sequence[Sequence[float]]] = None,
           method: str = "dera", value_checkpoint: Optional[str] = None,
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

  DeRa settings: `lambdas` (default [1.0]) with one `aligned_checkpoint`
  (or none: the reference alone), mixing 'logits' or 'weights'; or, for
  several aligned models (Appendix B of the paper), `aligned_checkpoints`
  [M] with `lambda_vectors` [K][M] (one weight per aligned model): row k
  samples softmax(sum_i lam_ki h_i + (1 - sum_i lam_ki) h_ref), all K in one
  batched call (logit mixing only).
  Method settings (each read only by its method):
    cd_token: value_checkpoint, cd_beta (beta of pi ~ p exp(V / beta)), cd_top_k
      (candidates per step; 0 = the whole vocabulary, Q-head value models only).
    cd_block: value_checkpoint, block_candidates (K), block_length (M).
    tq_direct / tq_indirect: baseline_checkpoint, `tq` (TQConfig; its `mode` is
      set by the method; `alpha_convention` 'paper' (default): alpha is the KL
      weight, p exp(Q / alpha), larger = closer to p; 'authors': log p + alpha Q
      as the authors' code, larger = further), the target reward (reward or
      reward_checkpoint) and,
      for indirect, the baseline's reward (baseline_reward or
      baseline_reward_checkpoint), which must be a different reward.
    args: args_top_k, args_weight and the reward.
  `sampling` decodes (temperature / greedy; KL is exact for the sampled
  distribution; blockwise CD draws its blocks with it); its eos and pad ids
  are the models' (leave them unset).
  `chat_template`: render each prompt with the vocabulary's chat template
  (tokenizer_config.json beside `vocab_path`) as one user message.
  """
  # NOTE: gin passes values on as written (batch_size='8'): types first.
  from realign_jax import config_check
  config_check.check_args(decode, dict(locals()))
  if method not in METHODS:
    raise UserError(f"decode method must be one of {METHODS}, got {method!r}")
  # NOTE: a model decoded with another vocabulary than its own is garbage that
  # looks like output; model.json records the one each run was trained with.
  for name, ckpt in (("ref_checkpoint", ref_checkpoint), ("aligned_checkpoint", aligned_checkpoint),
                     *(("aligned_checkpoints", c) for c in aligned_checkpoints or ()),
                     ("value_checkpoint", value_checkpoint),
                     ("baseline_checkpoint", baseline_checkpoint),
                     ("reward_checkpoint", reward_checkpoint),
                     ("baseline_reward_checkpoint", baseline_reward_checkpoint)):
    if ckpt:
      run_dir.check_vocabulary(ckpt, run_dir.recorded_vocabulary(ckpt), vocab_path,
                               allow_other=allow_vocabulary_mismatch, where=name)
  if method != "dera":
    if aligned_checkpoints is not None or lambda_vectors is not None:
      raise UserError(f"aligned_checkpoints and lambda_vectors are read by method 'dera' only, "
                      f"not {method!r}")
    return _decode_method(
        method, ref_checkpoint=ref_checkpoint, output_file=output_file,
        aligned_checkpoint=aligned_checkpoint, value_checkpoint=value_checkpoint,
        baseline_checkpoint=baseline_checkpoint, reward=reward,
        reward_checkpoint=reward_checkpoint, baseline_reward=baseline_reward,
        baseline_reward_checkpoint=baseline_reward_checkpoint, cd_beta=cd_beta,
        cd_top_k=cd_top_k, block_candidates=block_candidates, block_length=block_length, tq=tq,
        args_top_k=args_top_k, args_weight=args_weight, task=task, split=split,
        prompt_file=prompt_file, data_dir=data_dir, vocab_path=vocab_path,
        max_prompts=max_prompts, input_length=input_length, batch_size=batch_size,
        num_samples=num_samples, sampling=sampling, seed=seed, progress=progress,
        chat_template=chat_template)
  # ---- validate everything before any compute --------------------------------
  if mixing not in MIXINGS:
    raise UserError(f"mixing must be one of {MIXINGS}, got {mixing!r}")
  multi = aligned_checkpoints is not None
  if multi:
    aligned_dirs, lambdas = _check_multi(aligned_checkpoint, aligned_checkpoints, lambdas,
                                         lambda_vectors, mixing)
  else:
    if lambda_vectors is not None:
      raise UserError("lambda_vectors weighs several aligned models: give them as "
                      "decode.aligned_checkpoints (or use decode.lambdas with one "
                      "aligned_checkpoint)")
    lambdas = dera.check_lambdas((1.0,) if lambdas is None else lambdas)
    if len(set(lambdas)) != len(lambdas):
      raise UserError(f"the lambda list has duplicates: {lambdas}")
    aligned_dirs = [aligned_checkpoint] if aligned_checkpoint else []
  _check_common(num_samples, batch_size, output_file)
  ref_cfg, _ = ckpt_lib.read_model_json(ref_checkpoint)
  for aligned_dir in aligned_dirs:  # NOTE: every aligned model, before any params are read
    al_cfg, _ = ckpt_lib.read_model_json(aligned_dir)
    if al_cfg.vocab_size != ref_cfg.vocab_size:
      raise UserError(f"reference and aligned models have different vocabulary sizes: "
                      f"{ref_cfg.vocab_size} ({ref_checkpoint}) vs {al_cfg.vocab_size} "
                      f"({aligned_dir})")
    check_same_tokens(ref_cfg, ref_checkpoint, al_cfg, aligned_dir)
  vocab, prompts, inputs = load_prompts(ref_cfg, vocab_path, prompt_file, task, split, data_dir,
                                        max_prompts, input_length, chat_template=chat_template,
                                        ref_checkpoint=ref_checkpoint)

  mesh = host_mesh()
  rules = partitioning.logical_axis_rules()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    ref = load_component(ref_checkpoint, mesh, rules)
    aligned = [load_component(d, mesh, rules) for d in aligned_dirs]
    if mixing == "weights" and aligned:
      dera.check_same_architecture(aligned[0].params, ref.params)
    run = _make_runner(ref, aligned, lambdas, mixing, sampling, num_samples, multi)
    rows = _decode_all(run, inputs, prompts, vocab, lambdas, num_samples, batch_size, seed,
                       mixing, bool(aligned), progress, multi=multi, greedy=sampling.greedy)
  write_rows(rows, output_file)
  kl = np.array([r["kl"] for r in rows])
  return {"rows": len(rows), "prompts": len(prompts), "lambdas": lambdas,
          "mean_kl": float(kl.mean()), "output_file": output_file}


def _check_multi(aligned_checkpoint, aligned_checkpoints, lambdas, lambda_vectors,
                 mixing) -> tuple:
  """(aligned run directories, weight vectors) of multi-model DeRa, or a one-line UserError."""
  if aligned_checkpoint:
    raise UserError("give decode.aligned_checkpoint (one aligned model, with lambdas) or "
                    "decode.aligned_checkpoints (several, with lambda_vectors), not both")
  if (isinstance(aligned_checkpoints, (str, bytes)) or not aligned_checkpoints
      or not all(isinstance(d, str) and d for d in aligned_checkpoints)):
    raise UserError(f"aligned_checkpoints must be a non-empty list of run directories, got "
                    f"{aligned_checkpoints!r}")
  if lambdas is not None:
    raise UserError("with aligned_checkpoints the weights are decode.lambda_vectors (one "
                    "weight per aligned model per row), not decode.lambdas")
  if lambda_vectors is None:
    raise UserError(f"aligned_checkpoints needs decode.lambda_vectors: a list of weight lists, "
                    f"each with {len(aligned_checkpoints)} weights (one per aligned model)")
  if mixing != "logits":
    # NOTE: Appendix B mixes logits; weight mixing is defined here for one aligned model.
    raise UserError(f"several aligned models are mixed in logits only (mixing='logits'), got "
                    f"mixing={mixing!r}")
  return list(aligned_checkpoints), dera.check_lambda_vectors(lambda_vectors,
                                                              len(aligned_checkpoints))


def _check_common(num_samples: int, batch_size: int, output_file: str) -> None:
  if num_samples < 1:
    raise UserError(f"num_samples must be >= 1, got {num_samples}")
  if batch_size < 1:
    raise UserError(f"batch_size must be >= 1, got {batch_size}")
  from realign_jax import config_check
  config_check.check_output_file(output_file)


def check_same_tokens(cfg_a, dir_a: str, cfg_b, dir_b: str) -> None:
  """Refuses two models that record different special ids (both named)."""
  if cfg_a.tokens != cfg_b.tokens:
    raise UserError(f"{dir_b} records special token ids {cfg_b.tokens.describe()} but {dir_a} "
                    f"records {cfg_a.tokens.describe()}; the models must share one tokenizer")


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

  NOTE: on several hosts every process decodes every prompt on its own
  devices (no cross-host collective; the rows are the same on every host, each
  row's sample depending only on its seed) and process 0 alone writes them.
  """
  if jax.process_count() == 1:
    return partitioning.create_mesh()
  return partitioning.create_mesh(devices=jax.local_devices())


def _make_runner(ref, aligned, lambdas, mixing, cfg, n, multi=False):
  """Returns jitted run(inputs, seeds, rng) -> SampleOutput with rows (b, j, k).

  `aligned` is a list of Components (empty: the reference alone); with
  `multi`, `lambdas` are weight vectors, one weight per aligned model.
  """
  if multi:
    lam_vecs = jnp.asarray(lambdas, jnp.float32)  # [K, M]
    return [(None, jax.jit(lambda x, s, r: dera.multi_sweep(ref, aligned, x, lam_vecs, r, cfg,
                                                            seeds=s, num_samples=n)))]
  if not aligned:
    def run(inputs, seeds, rng):
      sample_ids = (seeds[:, None] * n + jnp.arange(n)[None]).reshape(-1)
      return dera.sample_mixture([ref], jnp.ones((1,)), inputs, rng, cfg, num_samples=n,
                                 row_ids=sample_ids, reference_index=0)
    return [(None, jax.jit(run))]
  aligned = aligned[0]
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
                has_aligned, progress, *, multi=False, greedy=False):
  from tqdm import tqdm
  rng = jax.random.PRNGKey(seed)
  num = inputs.shape[0]
  rows = [None] * (num * n * len(lambdas if has_aligned else [0]))
  total_tokens, t0 = 0, time.perf_counter()
  bar = tqdm(total=num, desc="decode", unit="prompt", mininterval=1.0,
             disable=not progress or jax.process_index() != 0)
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
            comp = out.model_logprobs[:, r, :length]
            ref_lp = comp[0] if mixing == "logits" or not has_aligned else comp[1]
            if greedy:
              # NOTE: greedy decoding samples a point mass per step, not softmax
              # of the mixed logits: log q = 0 and KL(q || p_ref) = -log p_ref(y_t),
              # as every other method's greedy rows (`_decode_method_all`).
              lp = np.zeros_like(ref_lp)
              kl = float(-np.sum(ref_lp))
            else:
              lp = out.logprobs[r, :length]
              kl = float(np.sum(out.kl[r, :length]))
            if lam is None:
              lam_value = None
            else:
              lam_value = [float(x) for x in lam] if multi else float(lam)
            row = {
                "prompt": prompts[p_idx], "response": vocab_lib.decode(vocab, out.tokens[r].tolist()),
                "lam": lam_value, "seed": seed,
                "row_seed": int(p_idx * n + j), "prompt_index": int(p_idx), "sample": j,
                "mixing": mixing if has_aligned else "none",
                "tokens": out.tokens[r, :length].tolist(), "length": length,
                "logprobs": lp.tolist(), "ref_logprobs": ref_lp.tolist(),
                "kl": kl, "log_ratio": float(np.sum(lp - ref_lp)),
            }
            if multi:  # one list per aligned model, in the order of aligned_checkpoints
              row["aligned_model_logprobs"] = comp[1:].tolist()
            elif has_aligned:
              row["aligned_logprobs"] = (comp[1] if mixing == "logits" else comp[2]).tolist()
            lam_pos = 0 if lam is None else lambdas.index(lam)
            rows[(p_idx * n + j) * (len(lambdas) if has_aligned else 1) + lam_pos] = row
    bar.update(len(idx))
    bar.set_postfix(tok_s=f"{total_tokens / max(time.perf_counter() - t0, 1e-9):.0f}")
  bar.close()
  return rows


# ---- controlled decoding, Transfer Q*, ARGS ------------------------------------------
TQ_METHODS = ("tq_direct", "tq_indirect")
REWARD_METHODS = TQ_METHODS + ("args",)
VALUE_METHODS = ("cd_token", "cd_block")


def load_value_model(model_dir: str, mesh, rules) -> dera.Component:
  """A value model run directory (configs/value/) as a sharded Component.

  Its model.json's output_head decides the kind: 'scalar' (or 'lm+scalar') is
  V([s, z]) per prefix, 'lm' a Q-head whose logits are Q(s)[z].
  """
  config, head = ckpt_lib.read_model_json(model_dir)
  lm = LanguageModel(config, head)
  return dera.Component(lm, ckpt_lib.load_params(model_dir, _sharded_abstract(lm, mesh, rules)))


def _sharded_abstract(lm: LanguageModel, mesh, rules):
  abstract, axes = lm.abstract_init()
  shardings = partitioning.logical_to_mesh_sharding(axes, mesh, rules)
  return jax.tree_util.tree_map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract, shardings)


def reward_label(r: Reward) -> str:
  """A short, stable description of a reward (rows' setting; distinctness check)."""
  from realign_jax.rewards import learned
  if isinstance(r, learned.LearnedReward):
    return f"learned:{os.path.normpath(r.model_dir)}"
  if dataclasses.is_dataclass(r):
    fields = ", ".join(f"{f.name}={getattr(r, f.name)!r}" for f in dataclasses.fields(r)
                       if f.name not in ("name", "vocab_path", "batch_size"))
    return f"{getattr(r, 'name', type(r).__name__)}({fields})"
  return getattr(r, "name", type(r).__name__)


def _same_reward(a: Reward, b: Reward) -> bool:
  from realign_jax.rewards import learned
  if a is b:
    return True
  if isinstance(a, learned.LearnedReward) and isinstance(b, learned.LearnedReward):
    return os.path.realpath(a.model_dir) == os.path.realpath(b.model_dir)
  return (dataclasses.is_dataclass(a) and type(a) is type(b)
          and reward_label(a) == reward_label(b))


def _resolve_reward(method: str, obj: Optional[Reward], ckpt: Optional[str], what: str,
                    vocab_path: Optional[str], input_length: int, vocab_size: int,
                    tokens) -> Reward:
  """The reward given by gin (`obj`) or by a reward-model run directory (`ckpt`)."""
  from realign_jax.rewards import learned
  if obj is not None and ckpt:
    raise UserError(f"give decode.{what} or decode.{what}_checkpoint, not both")
  if ckpt:
    obj = learned.LearnedReward(model_dir=ckpt, vocab_path=vocab_path, input_length=input_length)
  if obj is None:
    raise UserError(f"method {method!r} needs decode.{what}_checkpoint (a reward-model run "
                    f"directory) or decode.{what} (e.g. @LengthReward())")
  if not isinstance(obj, Reward):
    raise UserError(f"decode.{what} must be a Reward (e.g. @LengthReward()), got "
                    f"{type(obj).__name__}")
  if obj.special_tokens() != tokens:
    raise UserError(f"the {what} {reward_label(obj)} reads special token ids "
                    f"{obj.special_tokens().describe()} but the policy records "
                    f"{tokens.describe()}; give the reward the policy's vocabulary (vocab_path)")
  lm = getattr(obj, "lm", None)
  if lm is not None and lm.vocab_size != vocab_size:
    raise UserError(f"the {what} model {reward_label(obj)} has vocabulary size "
                    f"{lm.vocab_size} but the policy has {vocab_size}; they must share one "
                    f"vocabulary")
  return obj


def _validate_method(method, *, ref_cfg, aligned_checkpoint, value_checkpoint,
                     baseline_checkpoint, reward, reward_checkpoint, baseline_reward,
                     baseline_reward_checkpoint, cd_beta, cd_top_k, block_candidates,
                     block_length, tq, args_top_k, args_weight, vocab_path, input_length,
                     sampling):
  """Every setting of a non-DeRa method checked from model.json files alone (no params).

  Returns (setting dict for the rows, TQConfig or None, target reward, baseline reward).
  """
  if aligned_checkpoint:
    raise UserError(f"aligned_checkpoint is read by method 'dera' only, not {method!r}; "
                    f"unset it (for TQ* the aligned baseline is baseline_checkpoint)")
  vocab_size = ref_cfg.vocab_size
  ref = dera.Component(LanguageModel(ref_cfg), None)
  temp = None if sampling.greedy else float(sampling.temperature)
  setting, tq_cfg, target, base_r = {}, None, None, None
  if method in VALUE_METHODS:
    if not value_checkpoint:
      raise UserError(f"method {method!r} needs decode.value_checkpoint (a value-model run "
                      f"directory, see configs/value/)")
    vcfg, vhead = ckpt_lib.read_model_json(value_checkpoint)
    value = dera.Component(LanguageModel(vcfg, vhead), None)
    kind = controlled.head_kind(value)
    controlled.check_same_vocab(ref, value, f"value model {value_checkpoint}")
    head = "q" if kind == "q" else "scalar"
    if method == "cd_token":
      controlled.check_positive("cd_beta", cd_beta)
      if cd_top_k == 0 and kind != "q":
        # NOTE: a scalar head scores candidates on its cache forked once per
        # candidate: the whole vocabulary would fork it V ways every step.
        raise UserError(f"cd_top_k = 0 (the whole vocabulary) needs a Q-head value model "
                        f"(output_head 'lm'); {value_checkpoint} has a scalar head: set cd_top_k "
                        f"to the number of candidates")
      if cd_top_k != 0:
        controlled.check_top_k(cd_top_k, vocab_size, "cd_top_k (candidates per step)")
      setting = {"beta": float(cd_beta), "top_k": cd_top_k, "value_head": head,
                 "temperature": temp}
    else:
      controlled.check_at_least_one("block_candidates (K, blocks per step)", block_candidates)
      controlled.check_at_least_one("block_length (M, tokens per block)", block_length)
      setting = {"num_candidates": block_candidates, "block_length": block_length,
                 "value_head": head, "temperature": float(sampling.temperature)}
  if method in REWARD_METHODS:
    target = _resolve_reward(method, reward, reward_checkpoint, "reward", vocab_path,
                             input_length, vocab_size, ref_cfg.tokens)
    if method == "tq_indirect":
      base_r = _resolve_reward(method, baseline_reward, baseline_reward_checkpoint,
                               "baseline_reward", vocab_path, input_length, vocab_size,
                               ref_cfg.tokens)
      if _same_reward(target, base_r):
        raise UserError(f"indirect Transfer Q* needs two different rewards, but reward and "
                        f"baseline_reward are the same ({reward_label(target)}); use "
                        f"tq_direct when the baseline is aligned to the target reward")
    elif baseline_reward is not None or baseline_reward_checkpoint:
      raise UserError(f"baseline_reward is read by method 'tq_indirect' only, not {method!r}")
  if method in TQ_METHODS:
    if not baseline_checkpoint:
      raise UserError(f"method {method!r} needs decode.baseline_checkpoint (the aligned "
                      f"baseline policy's run directory)")
    bcfg, _ = ckpt_lib.read_model_json(baseline_checkpoint)
    # NOTE: the method, not TQConfig.mode, decides direct or indirect transfer.
    tq_cfg = dataclasses.replace(tq, mode="direct" if method == "tq_direct" else "indirect")
    transfer_q.validate_tq(ref, dera.Component(LanguageModel(bcfg), None), tq_cfg,
                           baseline_reward=None if base_r is None else (lambda *a: None))
    # NOTE: alpha means opposite things under the two conventions; the rows say which.
    setting = {"top_k": tq_cfg.top_k, "horizon": tq_cfg.horizon, "alpha": float(tq_cfg.alpha),
               "alpha_convention": tq_cfg.alpha_convention,
               "num_rollouts": tq_cfg.num_rollouts, "reward": reward_label(target),
               "temperature": temp}
    if method == "tq_indirect":
      setting.update(weighting=tq_cfg.weighting, alpha_traj=float(tq_cfg.alpha_traj),
                     baseline_reward=reward_label(base_r))
  if method == "args":
    transfer_q.validate_args(ref, args_top_k, args_weight)
    setting = {"top_k": args_top_k, "weight": float(args_weight),
               "reward": reward_label(target), "temperature": temp}
  return setting, tq_cfg, target, base_r


def _decode_method(method: str, *, ref_checkpoint, output_file, aligned_checkpoint,
                   value_checkpoint, baseline_checkpoint, reward, reward_checkpoint,
                   baseline_reward, baseline_reward_checkpoint, cd_beta, cd_top_k,
                   block_candidates, block_length, tq, args_top_k, args_weight, task, split,
                   prompt_file, data_dir, vocab_path, max_prompts, input_length, batch_size,
                   num_samples, sampling, seed, progress, chat_template=False) -> dict:
  """`decode` for every method but DeRa: validate, load, probe the rewards, decode, write."""
  # ---- validate everything before any compute --------------------------------
  _check_common(num_samples, batch_size, output_file)
  ref_cfg, _ = ckpt_lib.read_model_json(ref_checkpoint)
  setting, tq_cfg, target, base_r = _validate_method(
      method, ref_cfg=ref_cfg, aligned_checkpoint=aligned_checkpoint,
      value_checkpoint=value_checkpoint, baseline_checkpoint=baseline_checkpoint, reward=reward,
      reward_checkpoint=reward_checkpoint, baseline_reward=baseline_reward,
      baseline_reward_checkpoint=baseline_reward_checkpoint, cd_beta=cd_beta, cd_top_k=cd_top_k,
      block_candidates=block_candidates, block_length=block_length, tq=tq, args_top_k=args_top_k,
      args_weight=args_weight, vocab_path=vocab_path, input_length=input_length,
      sampling=sampling)
  for name, other in (("value_checkpoint", value_checkpoint),
                      ("baseline_checkpoint", baseline_checkpoint)):
    if other:
      check_same_tokens(ref_cfg, ref_checkpoint, ckpt_lib.read_model_json(other)[0], other)
  vocab, prompts, inputs = load_prompts(ref_cfg, vocab_path, prompt_file, task, split, data_dir,
                                        max_prompts, input_length, chat_template=chat_template,
                                        ref_checkpoint=ref_checkpoint)

  mesh = host_mesh()
  rules = partitioning.logical_axis_rules()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    comps = {"ref": load_component(ref_checkpoint, mesh, rules)}
    if method in VALUE_METHODS:
      comps["value"] = load_value_model(value_checkpoint, mesh, rules)
    if method in TQ_METHODS:
      comps["baseline"] = load_component(baseline_checkpoint, mesh, rules)
    rewards = {}
    for key, r in (("reward", target), ("baseline_reward", base_r)):
      if r is not None:
        r.setup(mesh, rules)
        rewards[key] = r
        # a reward that is NaN on a probe is refused before any decoding
        probe = jax.jit(lambda p, x, y, n, r=r: r.score_tokens(p, x, y, n))
        transfer_q.check_reward_finite(
            lambda x, y, n, p=r.params(), probe=probe: probe(p, x, y, n),
            jnp.asarray(inputs[:batch_size]), what=f"{key} {reward_label(r)}",
            tokens=ref_cfg.tokens)
    params = {k: c.params for k, c in comps.items()}
    params.update({k: r.params() for k, r in rewards.items()})
    run = _method_runner(method, {k: c.lm for k, c in comps.items()}, rewards, sampling,
                         num_samples, cd_beta=cd_beta, cd_top_k=cd_top_k,
                         block_candidates=block_candidates, block_length=block_length,
                         tq_cfg=tq_cfg, args_top_k=args_top_k, args_weight=args_weight)
    rows, timing = _decode_method_all(run, params, inputs, prompts, vocab, method, setting,
                                      num_samples, batch_size, seed, sampling, block_candidates,
                                      block_length, progress)
  write_rows(rows, output_file)
  summary = {"rows": len(rows), "prompts": len(prompts), "method": method, "setting": setting,
             "output_file": output_file, **timing}
  if method == "cd_block":
    summary["mean_kl_bound"] = float(np.mean([r["kl_bound"] for r in rows]))
    summary["mean_kl_estimate"] = float(np.mean([r["kl_estimate"] for r in rows]))
    summary["kl_kind"] = "bound"
    summary["kl_to"] = rows[0]["kl_to"]
  else:
    summary["mean_kl"] = float(np.mean([r["kl"] for r in rows]))
    summary["kl_kind"] = "exact"
  return summary


def _method_runner(method, lms, rewards, cfg, n, *, cd_beta, cd_top_k, block_candidates,
                   block_length, tq_cfg, args_top_k, args_weight):
  """jitted run(params, inputs, seeds, rng) -> dict of [B * n, ...] arrays, rows (b, j).

  Params travel as arguments (not constants baked into the program).
  """
  def run(params, inputs, seeds, rng):
    row_ids = (seeds[:, None] * n + jnp.arange(n)[None]).reshape(-1)
    ref = dera.Component(lms["ref"], params["ref"])
    reward = (transfer_q.token_reward(rewards["reward"], params["reward"])
              if "reward" in rewards else None)
    nonfinite = None
    if method == "cd_token":
      value = dera.Component(lms["value"], params["value"])
      out = controlled.tokenwise_cd(ref, value, inputs, rng, cfg, beta=cd_beta, top_k=cd_top_k,
                                    num_samples=n, row_ids=row_ids)
    elif method == "cd_block":
      value = dera.Component(lms["value"], params["value"])
      out = controlled.blockwise_cd(ref, value, inputs, rng, cfg, num_blocks=block_candidates,
                                    block_len=block_length, num_samples=n, row_ids=row_ids)
    elif method in TQ_METHODS:
      baseline = dera.Component(lms["baseline"], params["baseline"])
      base_r = (transfer_q.token_reward(rewards["baseline_reward"], params["baseline_reward"])
                if "baseline_reward" in rewards else None)
      out, nonfinite = transfer_q.transfer_q(ref, baseline, inputs, rng, cfg, tq_cfg, reward,
                                             baseline_reward=base_r, num_samples=n,
                                             row_ids=row_ids)
    else:
      out, nonfinite = transfer_q.args_decode(ref, inputs, rng, cfg, reward, top_k=args_top_k,
                                              weight=args_weight, num_samples=n,
                                              row_ids=row_ids)
    return {"tokens": out.tokens, "logprobs": out.logprobs, "lengths": out.lengths,
            "ref_logprobs": out.model_logprobs[0], "kl": out.kl, "nonfinite": nonfinite,
            "proposal_logprobs": out.model_logprobs[1] if method == "cd_block" else None}
  return jax.jit(run)


def _decode_method_all(run, params, inputs, prompts, vocab, method, setting, n, batch_size, seed,
                       cfg, block_candidates, block_length, progress):
  """Decodes in fixed-size batches (one compiled program); returns (rows, timing)."""
  from tqdm import tqdm
  from realign_jax.evaluation import best_of_n_theory
  rng = jax.random.PRNGKey(seed)
  num = inputs.shape[0]
  rows = []
  compiled, compile_s, decode_s, total_tokens, rounds = None, 0.0, 0.0, 0, 0
  bar = tqdm(total=num, desc=f"decode {method}", unit="prompt",
             disable=not progress or jax.process_index() != 0,
             mininterval=1.0)
  for start in range(0, num, batch_size):
    idx = np.arange(start, min(start + batch_size, num))
    pad = batch_size - len(idx)
    batch_idx = np.concatenate([idx, np.full(pad, idx[0])]) if pad else idx
    args = (params, jnp.asarray(inputs[batch_idx]), jnp.asarray(batch_idx, jnp.int32), rng)
    if compiled is None:
      # NOTE: compiled ahead of time so tokens/s and the per-block latency
      # measure decoding, not compilation.
      t0 = time.perf_counter()
      compiled = run.lower(*args).compile()
      compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = jax.device_get(compiled(*args))
    seconds = time.perf_counter() - t0
    decode_s += seconds
    if out["nonfinite"] is not None:
      bad = np.asarray(out["nonfinite"]).reshape(-1, n)[:len(idx)]
      if bad.any():
        p = int(idx[np.argmax(bad.any(axis=1))])
        raise UserError(f"a reward returned a non-finite score while decoding prompt {p} "
                        f"({prompts[p][:60]!r}); nothing was written")
    lengths = np.asarray(out["lengths"])
    batch_rounds, latency = 0, None
    if method == "cd_block":
      # every row of the batch proposes blocks until the longest row is done
      batch_rounds = int(np.max(controlled.num_blocks_used(lengths, block_length)))
      rounds += batch_rounds
      latency = seconds / max(batch_rounds, 1)
    for bi, p_idx in enumerate(idx):
      for j in range(n):
        r = bi * n + j
        length = int(lengths[r])
        total_tokens += length
        ref_lp = np.asarray(out["ref_logprobs"][r, :length])
        row = {"prompt": prompts[p_idx],
               "response": vocab_lib.decode(vocab, out["tokens"][r].tolist()), "method": method, "setting": setting, "seed": seed, "row_seed": int(p_idx * n + j),
               "prompt_index": int(p_idx), "sample": j,
               "tokens": out["tokens"][r, :length].tolist(), "length": length}
        if method == "cd_block":
          blocks = int(controlled.num_blocks_used(length, block_length))
          prop_lp = np.asarray(out["proposal_logprobs"][r, :length])
          # NOTE: blockwise CD has no per-token distribution; each block is a
          # best-of-K draw from the proposal p~(. | s), so by the chain rule over
          # blocks the mean of blocks x (log K - (K - 1) / K) bounds KL(cd || p~),
          # and the sum over blocks of the best-of-K estimator
          # KL_hat(p~(block | s), K) estimates it. p~ is p itself only at
          # temperature 1 without top-k / top-p (`kl_to` says which);
          # ref_logprobs are always under p, proposal_logprobs under p~.
          row.update(ref_logprobs=ref_lp.tolist(), proposal_logprobs=prop_lp.tolist(),
                     blocks=blocks, block_latency_s=latency, kl_kind="bound",
                     kl_to=_block_kl_to(cfg),
                     kl_bound=blocks * best_of_n_theory.kl_bound(block_candidates),
                     kl_estimate=block_kl_estimate(prop_lp, block_length, block_candidates))
        else:
          if cfg.greedy:  # a point mass per step: log q = 0, KL = -log p_ref(y_t)
            lp = np.zeros_like(ref_lp)
            kl = float(-np.sum(ref_lp))
          else:
            lp = np.asarray(out["logprobs"][r, :length])
            kl = float(np.sum(out["kl"][r, :length]))
          row.update(logprobs=lp.tolist(), ref_logprobs=ref_lp.tolist(), kl=kl,
                     log_ratio=float(np.sum(lp - ref_lp)), kl_kind="exact")
        rows.append(row)
    bar.update(len(idx))
    bar.set_postfix(tok_s=f"{total_tokens / max(decode_s, 1e-9):.0f}")
  bar.close()
  timing = {"compile_s": compile_s, "decode_s": decode_s, "tokens": total_tokens,
            "tokens_per_s": total_tokens / max(decode_s, 1e-9)}
  if method == "cd_block":
    timing["block_rounds"] = rounds
    timing["block_latency_s"] = decode_s / max(rounds, 1)
  return rows, timing


def _block_kl_to(cfg: sampler.SamplingConfig) -> str:
  """What blockwise CD's KL bound and estimate are relative to: 'p' or 'proposal'."""
  is_p = (not cfg.greedy and cfg.temperature == 1.0 and not cfg.top_k and cfg.top_p >= 1.0)
  return "p" if is_p else "proposal"


def block_kl_estimate(proposal_logprobs, block_length: int, num_candidates: int) -> float:
  """Sum over the blocks of a response of KL_hat(eps, K), eps = p~(block | prefix).

  `proposal_logprobs` are the tokens' log-probs under the distribution the
  blocks were drawn from (the proposal p~; p itself at temperature 1 without
  truncation).

  The best-of-n estimator per block (`best_of_n_theory.kl_estimator`); a
  block cut by EOS counts with the tokens it has.
  """
  from realign_jax.evaluation import best_of_n_theory
  lp = np.asarray(proposal_logprobs, np.float64)
  if lp.size == 0:
    return 0.0
  sums = np.add.reduceat(lp, np.arange(0, lp.size, block_length))
  eps = np.clip(np.exp(sums), np.finfo(np.float64).tiny, 1.0)
  return float(np.sum(best_of_n_theory.kl_estimator(eps, num_candidates)))


def main(argv: list) -> int:
  summary = gin_utils.call(gin_utils.configure_binary(
      argv, "decode", decode, extra=[(sampler.SamplingConfig, "SamplingConfig")]))
  gin_utils.write_operative_config_beside(summary["output_file"])
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
