"""The TL;DR-style study's preference pairs: synthetic (gold-labelled SFT samples) or human.

The `preferences` stage writes TRAIN_PAIRS (the reward model's and DPO's
training pairs) and HELDOUT_PAIRS (the pairs of pairwise accuracy, eq. 14) in
the preference schema: from two SFT samples per prompt labelled by the gold
reward, or from the TL;DR comparisons release.
"""

import dataclasses
import os

import flax.linen as nn
import jax

from realign_jax.plumbing import paths
from realign_jax.data import pipeline
from realign_jax.data import preferences as prefs_lib
from realign_jax.plumbing.errors import UserError
from realign_jax.experiments import stages
from realign_jax.experiments.tldr_style.config import TldrPairs
from realign_jax.experiments.tldr_style.gold import GOLD_NAME, prompt_gold_fn
from realign_jax.inference import preferences as synth

TRAIN_PAIRS = "train.jsonl"
HELDOUT_PAIRS = "heldout.jsonl"


def pair_files(result: dict) -> list:
  """The preference stage's output files (`StageRunner.run`'s `files`)."""
  del result
  return [TRAIN_PAIRS, HELDOUT_PAIRS]


@dataclasses.dataclass(frozen=True)
class PairSettings:
  """How the synthetic preference pairs are drawn."""
  train_split: str
  num_train_prompts: int
  heldout_split: str
  num_heldout_prompts: int
  seed: int
  gold: str = GOLD_NAME


def write_human_pairs(stage_dir: str, comparisons_dir: str, heldout_split: str,
                      num_train: int, num_heldout: int) -> dict:
  """The preference stage on human data: the first pairs of the TL;DR comparisons' splits.

  Writes TRAIN_PAIRS (train) and HELDOUT_PAIRS (`heldout_split`) in the
  preference schema; upstream rows that are unusable (e.g. two identical
  summaries) are skipped and counted. Fewer valid pairs than asked is a
  UserError before anything is written.
  """
  plan = []
  for split, n, fname in (("train", num_train, TRAIN_PAIRS),
                          (heldout_split, num_heldout, HELDOUT_PAIRS)):
    rows, skipped = prefs_lib.load_tldr_comparisons(comparisons_dir, split, skip_invalid=True)
    if len(rows) < n:
      raise UserError(f"{n} preference pairs asked from split {split} of the TL;DR "
                      f"comparisons in {comparisons_dir}, which holds only {len(rows)} "
                      f"valid ones")
    plan.append((split, fname, rows[:n], skipped))
  out = {}
  for split, fname, rows, skipped in plan:
    # NOTE: process 0 alone writes; the others check and count the same rows.
    path = os.path.join(stage_dir, fname)
    written = (prefs_lib.write_preference_jsonl(path, rows) if stages.is_primary() else
               len([prefs_lib.validate_preference(r, where=f"row {i} written to {path}")
                    for i, r in enumerate(rows, start=1)]))
    out[split] = {"pairs": written, "skipped_invalid": skipped, "source": "tldr_comparisons"}
  return out


def recorded_settings(pairs: TldrPairs):
  """What the preference stage records of its pairs' settings."""
  if pairs.comparisons_dir:
    return {"source": "tldr_comparisons", "train_split": "train",
            "num_train_pairs": pairs.num_train_prompts, "heldout_split": pairs.heldout_split,
            "num_heldout_pairs": pairs.num_heldout_prompts,
            "data_dir": paths.abspath(pairs.comparisons_dir)}
  return PairSettings(train_split="train", num_train_prompts=pairs.num_train_prompts,
                      heldout_split=pairs.heldout_split,
                      num_heldout_prompts=pairs.num_heldout_prompts, seed=pairs.seed)


def write_synthetic_pairs(stage_dir: str, pairs: TldrPairs, *, lm, params, sft, sampling,
                          input_length: int, batch_size: int, mesh, rules) -> dict:
  """The preference stage on synthetic pairs: two samples of `params` per prompt, the gold
  reward picks `chosen` (`inference.preferences.build_synthetic_preferences`).

  NOTE: the builder samples in the one loop: on several processes each its own
  batches on its own devices (`mesh`: `loop.host_mesh()`), so `params` live there.
  """
  out = {}
  for split, n, fname in (("train", pairs.num_train_prompts, TRAIN_PAIRS),
                          (pairs.heldout_split, pairs.num_heldout_prompts, HELDOUT_PAIRS)):
    ex = pipeline.text_examples(sft.task, split, data_dir=sft.data_dir, limit=n)
    if len(ex) < n:
      raise UserError(f"{n} preference prompts asked from split {split} of {sft.task}, "
                      f"which holds only {len(ex)}")
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      st = synth.build_synthetic_preferences(
          lm=lm, params=params, prompts=[e["inputs"] for e in ex],
          gold_reward=prompt_gold_fn(ex), output_file=os.path.join(stage_dir, fname),
          sampling=sampling, input_length=input_length, batch_size=batch_size,
          seed=pairs.seed, vocab_path=sft.vocab_path)
    # NOTE: prompts_here (this process's share) depends on the host count, not the data.
    out[split] = {k: v for k, v in dict(dataclasses.asdict(st), skipped=st.skipped).items()
                  if k != "prompts_here"}
  return out
