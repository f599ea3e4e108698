r"""Synthetic preference pairs binary: two samples per prompt, labelled by a gold reward.

  python -m realign_jax.synthetic_preferences \
      --gin_file=configs/data/synthetic_preferences_tiny.gin \
      --gin.POLICY_CHECKPOINT="'SFT_DIR'" --gin.OUTPUT_DIR="'P'"

Writes OUTPUT_DIR/{train,validation,test}.jsonl for the `preferences` task:
prompts from a task's splits, two responses each from the policy run
directory, the one the gold reward scores higher `chosen` (ties, identical
and empty pairs skipped and counted). The sampling and labelling are
`realign_jax.inference.preferences` (the one batch loop: on several hosts
each samples its share of the batches, every host labels every pair, and
process 0 alone writes the files, those a single process writes).
"""

from realign_jax.plumbing import cli

cli.precheck(__name__)  # NOTE: before the heavy imports (see cli.py)

from typing import Any, Optional

import flax.linen as nn
import jax

from realign_jax.plumbing import gin_utils
from realign_jax.data import pipeline
from realign_jax.decoding import sampler
from realign_jax.plumbing.errors import UserError
from realign_jax.inference import components, loop
from realign_jax.inference import preferences as prefs_lib
from realign_jax.parallel import partitioning


def build_preference_dir(
    *, policy_checkpoint: str, output_dir: str, gold_reward: Any,
    task: str = "builtin_summarize", data_dir: Optional[str] = None,
    num_prompts: Optional[dict] = None,
    sampling: sampler.SamplingConfig = sampler.SamplingConfig(), input_length: int = 96,
    batch_size: int = 32, seed: int = 0, vocab_path: Optional[str] = None) -> dict:
  """Writes OUTPUT_DIR/{train,validation,test}.jsonl for the `preferences` task.

  Prompts are the `inputs` of `task`'s splits (the first num_prompts[split]);
  responses come from the policy run directory `policy_checkpoint`;
  `gold_reward` is a `rewards.base.Reward` or a plain
  `(prompts, responses) -> scores` callable.
  """
  num_prompts = dict(num_prompts or {"train": 512, "validation": 128, "test": 128})
  unknown = sorted(set(num_prompts) - {"train", "validation", "test"})
  if unknown:
    raise UserError(f"num_prompts has unknown splits {unknown}; use train, validation, test")
  gold_reward = prefs_lib.gold_reward_fn(gold_reward)
  # NOTE: on several hosts each samples its share of the prompt batches on its
  # own devices (see inference.loop); every host labels every pair and process 0
  # alone writes the files.
  mesh, rules = loop.host_mesh(), partitioning.logical_axis_rules()
  # NOTE: every split is sampled and labelled before any file is written, so a
  # split without usable pairs leaves no other split's file behind.
  stats, built = {}, {}
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    policy = components.load_component(policy_checkpoint, mesh, rules)
    for split, n in num_prompts.items():
      prompts = [e["inputs"] for e in pipeline.text_examples(task, split, data_dir=data_dir,
                                                             limit=n)]
      out = f"{output_dir}/{split}.jsonl"
      stats[split], built[split] = prefs_lib.sample_and_label(
          lm=policy.lm, params=policy.params, prompts=prompts, gold_reward=gold_reward,
          output_file=out, sampling=sampling, input_length=input_length,
          batch_size=batch_size, seed=seed, vocab_path=vocab_path)
  for split, rows in built.items():
    prefs_lib.write_pairs(f"{output_dir}/{split}.jsonl", rows, stats[split])
  return stats


def main(argv: list) -> int:
  stats = gin_utils.call(gin_utils.configure_binary(argv, "build_preference_dir",
                                                    build_preference_dir))
  for split, s in stats.items():
    if jax.process_count() > 1:
      print(f"{split}: process {jax.process_index()} of {jax.process_count()} sampled "
            f"{s.prompts_here} of {s.prompts} prompts")
    print(f"{split}: {s.pairs} pairs from {s.prompts} prompts (skipped {s.ties} ties, "
          f"{s.identical} identical, {s.empty} empty)")
  return 0


if __name__ == "__main__":
  gin_utils.run_main(main)
