r"""Decoding binary: DeRa, controlled decoding, Transfer Q* and ARGS from run directories.

  python -m realign_jax.decode --gin_file=configs/decode/dera_builtin_tiny.gin \
      --gin.REF_CHECKPOINT="'runs/sft'" --gin.ALIGNED_CHECKPOINT="'runs/ppo'" \
      --gin.LAMBDAS="[0.0, 0.5, 1.0, 2.0]" --gin.OUTPUT_FILE="'runs/dera.jsonl'"

`decode.method` is a method object of `realign_jax.inference`, configured by
gin (`decode.method = @TokenwiseCD()`, `TokenwiseCD.beta = 0.5`):
  DeRa          DeRa lambda sweep, logit or weight mixing (`DeRa.lambdas`,
                `DeRa.aligned_checkpoint`; several aligned models: `DeRa.aligned_checkpoints`
                with `DeRa.lambda_vectors`);
  TokenwiseCD   token-wise CD with a value model (`TokenwiseCD.value_checkpoint`:
                output_head 'scalar' scores the top-k candidates, 'lm' is a Q-head over
                the vocabulary);
  BlockwiseCD   blockwise CD: K candidate blocks of M tokens, the best by V kept;
  TransferQ     Transfer Q* with a baseline aligned to the target reward, or
                (`TransferQ.indirect = True`) to another reward r_BL
                (`TQConfig.alpha_convention` = 'paper', the default, samples
                p exp(Q / alpha), alpha the KL weight; 'authors' scores
                log p + alpha Q as the authors' code);
  ARGS          ARGS: log p(z | s) + w r(x, [s, z]) over the top-k.
The rewards of TQ* and ARGS are a reward-model run directory
(`TransferQ.reward_checkpoint`) or a `Reward` bound by gin
(`TransferQ.reward = @LengthReward()`).
Configs: configs/decode/{dera,cd_token,cd_block,tq_direct,tq_indirect,args}_builtin_tiny.gin.

DeRa writes one JSON line per (prompt, sample, lambda): prompt, response, lam, seed,
row_seed, tokens, the per-token log-probs of the sampled distribution and of
each model, the exact sequence KL to the reference (sum over steps of the
full-vocabulary KL) and the sequence log-ratio estimate
sum_t log q(y_t) - log p_ref(y_t) (greedy rows: a point mass per step,
log q = 0 and KL = -sum_t log p_ref(y_t)). Several aligned models
(Appendix B of the paper, configs/decode/dera_multi_builtin_tiny.gin) mix
sum_i lam_i h_i + (1 - sum_i lam_i) h_ref; their rows' `lam` is the weight
vector and `aligned_model_logprobs` holds one list per aligned model. The
other methods write one line per (prompt, sample) with the same fields plus
`method` and `setting`. The file appears only when complete; the binary
then writes its operative gin config beside it (OUTPUT_FILE.config.gin).

Every method runs through the one batch loop (`inference.loop.decode_batches`).
On several hosts each process decodes its share of the prompt batches (batch
b on process b % P) on its own devices; each round's outputs are gathered, so
the rows are those of a one-process run, and process 0 alone writes the file.

Special ids and chat models: the models' special ids (model.json's
special_tokens; an HF directory's tokenizer files) must be the vocabulary's
(`decode.vocab_path`) and the same for every model combined; the sampler stops
at that eos and pads with that pad. `decode.chat_template = True` renders
each prompt with the chat template of the tokenizer's tokenizer_config.json
(one user message, generation prompt appended; `data/chat.py`), and the rows'
`prompt` is the rendered text. configs/decode/chat_dera.gin is the Zephyr
recipe (docs/chat_recipe.md).
"""

from realign_jax.plumbing import cli

cli.precheck(__name__)  # NOTE: before the heavy imports (see cli.py)

from typing import Optional

import jax

from realign_jax.plumbing import config_check
from realign_jax.plumbing import gin_utils
from realign_jax.decoding import sampler
from realign_jax.plumbing.errors import UserError
from realign_jax.inference import loop
from realign_jax.inference import run as run_lib
from realign_jax.inference.method import DecodeMethod
from realign_jax.inference.prompts import PromptSource

_OBJECTS = "@DeRa(), @TokenwiseCD(), @BlockwiseCD(), @TransferQ() or @ARGS()"


def decode(*, ref_checkpoint: str, output_file: str, method: Optional[DecodeMethod] = None,
           task: str = "builtin_summarize", split: str = "validation",
           prompt_file: Optional[str] = None, data_dir: Optional[str] = None,
           vocab_path: Optional[str] = None, max_prompts: Optional[int] = 64,
           input_length: int = 96, batch_size: int = 8, num_samples: int = 1,
           sampling: sampler.SamplingConfig = sampler.SamplingConfig(), seed: int = 0,
           progress: bool = True, allow_vocabulary_mismatch: bool = False,
           chat_template: bool = False) -> dict:
  """Decodes every prompt with `method`, writes the rows to `output_file`; a summary dict.

  Args:
    ref_checkpoint: the reference policy's run directory (every method decodes with it).
    output_file: the JSONL to write (it appears only complete).
    method: the decoding method object (gin: `decode.method = @DeRa()`).
    task, split, prompt_file, data_dir, vocab_path, max_prompts, input_length,
      chat_template: the prompts (`inference.prompts.PromptSource`).
    batch_size: prompts per batch.
    num_samples: samples per prompt.
    sampling: decodes (temperature / greedy; KL is exact for the sampled
      distribution; blockwise CD draws its blocks with it); its eos and pad ids
      are the models' (leave them unset).
    seed: the sampling seed.
    progress: a progress bar.
    allow_vocabulary_mismatch: decode run directories that record another vocabulary.
  """
  # NOTE: gin passes values on as written (batch_size='8'): types first.
  config_check.check_args(decode, dict(locals()))
  if isinstance(method, str):
    raise UserError(f"decode.method = {method!r} names a method; give the method object "
                    f"instead (decode.method = {_OBJECTS}) with its settings on it "
                    f"(e.g. TokenwiseCD.beta = 0.5)")
  if not isinstance(method, DecodeMethod):
    raise UserError(f"decode.method must be a decoding method, {_OBJECTS}; got {method!r}")
  config_check.check_output_file(output_file)
  prompts = PromptSource(task=task, split=split, prompt_file=prompt_file, data_dir=data_dir,
                         vocab_path=vocab_path, max_prompts=max_prompts,
                         input_length=input_length, chat_template=chat_template)
  rows, summary = run_lib.run(method, ref_checkpoint=ref_checkpoint, prompts=prompts,
                              batch_size=batch_size, num_samples=num_samples, sampling=sampling,
                              seed=seed, progress=progress,
                              allow_vocabulary_mismatch=allow_vocabulary_mismatch)
  loop.write_rows(rows, output_file)
  return dict(summary, output_file=output_file)


def main(argv: list) -> int:
  summary = gin_utils.call(gin_utils.configure_binary(argv, "decode", decode))
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
