"""A decoding method from run directories, end to end: check, load, probe, decode; the rows.

`run` is what the decode binary writes to a file and what the frontier study
decodes each of its stages with: every setting is checked before any params
are read (the vocabulary each run directory records, the method's settings
from model.json files, the prompts), then the components and rewards are
loaded onto `loop.host_mesh()`, the rewards probed, and every batch decoded
in the one loop.
"""

import dataclasses

import flax.linen as nn
import jax

from realign_jax.checkpoints import run_dir
from realign_jax.decoding import sampler
from realign_jax.plumbing.errors import UserError
from realign_jax.inference import components, loop
from realign_jax.inference import prompts as prompts_lib
from realign_jax.inference.method import Context, DecodeMethod
from realign_jax.parallel import partitioning


def checkpoints_of(method: DecodeMethod) -> list:
  """(name, run directory) of each checkpoint a method names: ('DeRa.aligned_checkpoint', d)."""
  out = []
  for f in dataclasses.fields(method):
    if not (f.name.endswith("checkpoint") or f.name.endswith("checkpoints")):
      continue
    value = getattr(method, f.name)
    for ckpt in value if isinstance(value, (list, tuple)) else [value]:
      out.append((f"{type(method).__name__}.{f.name}", ckpt))
  return out


def check_vocabularies(method: DecodeMethod, ref_checkpoint: str, vocab_path,
                       allow_other: bool = False) -> None:
  """Every run directory decoded with records the vocabulary `vocab_path` (or is refused).

  NOTE: a model decoded with another vocabulary than its own is garbage that
  looks like output; model.json records the one each run was trained with.
  """
  for name, ckpt in (("ref_checkpoint", ref_checkpoint), *checkpoints_of(method)):
    if ckpt:
      run_dir.check_vocabulary(ckpt, run_dir.recorded_vocabulary(ckpt), vocab_path,
                               allow_other=allow_other, where=name)


def run(method: DecodeMethod, *, ref_checkpoint: str, prompts: prompts_lib.PromptSource,
        batch_size: int = 8, num_samples: int = 1,
        sampling: sampler.SamplingConfig = sampler.SamplingConfig(), seed: int = 0,
        progress: bool = True, allow_vocabulary_mismatch: bool = False) -> tuple:
  """Decodes every prompt with `method`; (rows, summary), the same rows on every process.

  Args:
    method: a `method.DecodeMethod` (DeRa, TokenwiseCD, BlockwiseCD, TransferQ, ARGS).
    ref_checkpoint: the reference policy's run directory (every method decodes with it).
    prompts: where the prompts come from and how they are encoded.
    batch_size: prompts per batch.
    num_samples: samples per prompt.
    sampling: the sampler settings; its eos and pad ids are the models' (leave them unset).
    seed: the sampling seed.
    progress: a progress bar.
    allow_vocabulary_mismatch: decode run directories that record another vocabulary.

  Returns:
    The rows (prompt order, then sample, then lambda) and a summary: rows,
    prompts, the method's own summary (mean KL, ...) and the loop's timing.
  """
  if not isinstance(method, DecodeMethod):
    raise UserError(f"the decoding method must be a method object (DeRa, TokenwiseCD, "
                    f"BlockwiseCD, TransferQ, ARGS), got {method!r}")
  check_vocabularies(method, ref_checkpoint, prompts.vocab_path,
                     allow_other=allow_vocabulary_mismatch)
  if num_samples < 1:
    raise UserError(f"num_samples must be >= 1, got {num_samples}")
  if batch_size < 1:
    raise UserError(f"batch_size must be >= 1, got {batch_size}")
  ref_cfg, _ = run_dir.read_model_json(ref_checkpoint)
  method.check(Context(ref_checkpoint, ref_cfg, prompts.vocab_path, prompts.input_length,
                       sampling))
  vocab, texts, inputs = prompts_lib.load_prompts(prompts, ref_cfg, ref_checkpoint)

  mesh = loop.host_mesh()
  rules = partitioning.logical_axis_rules()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    comps = components.load_components(method, ref_checkpoint, mesh, rules)
    rewards = components.setup_rewards(method, mesh, rules, inputs[:batch_size], ref_cfg.tokens)
    runners = method.runners(comps, rewards, sampling, num_samples)
    rows, timing = loop.decode_batches(method, runners, inputs, texts, vocab, n=num_samples,
                                       batch_size=batch_size, seed=seed, sampling=sampling,
                                       progress=progress)
  summary = {"rows": len(rows), "prompts": len(texts), **method.summary(rows), **timing}
  return rows, summary
