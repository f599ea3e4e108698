"""Bradley-Terry reward model on (prompt, chosen, rejected) pairs.

The reward of a response is the scalar head read at the last real response
position (the EOS that `pipeline.fit` always appends): for both families that
output has attended to the whole prompt and every response token before EOS.
The loss is -log sigmoid(r(x, y_c) - r(x, y_r)), averaged over pairs.

`PreferenceAlgorithm` is the data and checkpoint plumbing that the reward
model and DPO share: preference pairs from a seqio task (`preferences`,
`tldr_comparisons`) or straight from JSONL files (where invalid rows can be
skipped and counted), deterministic resumable batches, padded eval batches,
and INIT_CHECKPOINT checks and loading.
"""

import dataclasses
import functools
import logging
import os
from typing import Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np

from realign_jax.checkpoints import manager as ckpt_lib
from realign_jax.checkpoints.run_dir import RunRecord
from realign_jax.data import pipeline
from realign_jax.data import preferences
from realign_jax.data import vocab as vocab_lib
from realign_jax.plumbing.errors import UserError
from realign_jax.models.api import LanguageModel
from realign_jax.parallel import multihost
from realign_jax.parallel.abstract import sharded_abstract  # noqa: F401  (re-exported)
from realign_jax.rewards.learned import sequence_rewards  # noqa: F401  (re-exported)
from realign_jax.training import policy as policy_lib
from realign_jax.training.trainer import Algorithm


# ---- losses -------------------------------------------------------------------
def bradley_terry_losses(r_chosen, r_rejected):
  """Per-pair -log sigmoid(r_c - r_r): [B], [B] -> [B] float32."""
  diff = r_chosen.astype(jnp.float32) - r_rejected.astype(jnp.float32)
  return -jax.nn.log_sigmoid(diff)


def preference_metrics(r_chosen, r_rejected, weights=None, prefix=""):
  """Accuracy (strictly r_c > r_r), mean margin, mean reward over both responses.

  Returns weighted means (`weights` [B], default all ones) as scalars.
  """
  w = jnp.ones_like(r_chosen, jnp.float32) if weights is None else weights.astype(jnp.float32)
  n = jnp.maximum(jnp.sum(w), 1.0)
  mean = lambda x: jnp.sum(x * w) / n
  return {f"{prefix}accuracy": mean((r_chosen > r_rejected).astype(jnp.float32)),
          f"{prefix}margin": mean(r_chosen - r_rejected),
          f"{prefix}reward_mean": mean(0.5 * (r_chosen + r_rejected)),
          f"{prefix}reward_chosen": mean(r_chosen),
          f"{prefix}reward_rejected": mean(r_rejected)}


def pair_rewards(lm: LanguageModel, params, batch, *, dropout_rng=None):
  """(r_chosen [B], r_rejected [B]) from one forward pass over the 2B responses."""
  b = batch["inputs"].shape[0]
  inputs = jnp.concatenate([batch["inputs"], batch["inputs"]], axis=0)
  responses = jnp.concatenate([batch["chosen"], batch["rejected"]], axis=0)
  r = sequence_rewards(lm, params, inputs, responses, dropout_rng=dropout_rng)
  return r[:b], r[b:]


# ---- INIT_CHECKPOINT ------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _sharded_init_fn(lm: LanguageModel, mesh, rules):
  shardings = jax.tree_util.tree_map(lambda s: s.sharding, sharded_abstract(lm, mesh, rules))
  return jax.jit(lambda r: lm.init(r)[0], out_shardings=shardings)


def init_params_sharded(lm: LanguageModel, mesh, rules, seed: int = 0):
  """`lm.init(PRNGKey(seed))` params, created directly in their mesh shardings.

  NOTE: the compiled init is cached per (model, mesh, rules): XLA takes
  seconds to compile the random initialisers even of a tiny model.
  """
  return _sharded_init_fn(lm, mesh, rules)(jax.random.PRNGKey(seed))


def load_trunk_params(path: str, model: LanguageModel, mesh, rules, *, seed: int = 0,
                      what: str = "INIT_CHECKPOINT"):
  """Params of `model` from a run directory of the same architecture, sharded on `mesh`.

  A checkpoint with another output head (an SFT "lm" model for a "scalar"
  reward model) gives the shared trunk; the parameters only `model` has (its
  head, zeros for ScalarHead) are freshly initialised from `seed`, those only
  the checkpoint has (the LM head) are dropped.
  """
  found_config, head = policy_lib.check_init_checkpoint(path, model.config, what)
  source = LanguageModel(found_config, head)
  params = ckpt_lib.load_params(path, sharded_abstract(source, mesh, rules))
  if head == model.output_head:
    return params
  target = sharded_abstract(model, mesh, rules)
  missing = [k for k in target if k not in params]
  fresh = init_params_sharded(model, mesh, rules, seed) if missing else {}
  logging.info("%s: loaded the trunk of a %r model; initialised %s", path, head, missing)
  return {k: params[k] if k in params else fresh[k] for k in target}


# ---- shared preference-data plumbing ---------------------------------------------
@dataclasses.dataclass
class PreferenceAlgorithm(Algorithm):
  """Data and checkpoint plumbing shared by the reward model and DPO.

  Pairs come from `train_file` / `eval_file` (preference JSONL, read directly;
  with `skip_invalid` bad rows are skipped and counted in the log, otherwise
  the first one stops the run naming file and row) or, when no file is
  given, from the seqio `task` (`preferences` over `data_dir`, or
  `tldr_comparisons`).
  """

  model: LanguageModel
  task: str = "preferences"
  data_dir: Optional[str] = None
  train_file: Optional[str] = None
  eval_file: Optional[str] = None
  skip_invalid: bool = False
  vocab_path: Optional[str] = None
  batch_size: int = 32
  input_length: int = 96
  target_length: int = 24
  eval_split: str = "validation"
  eval_batch_size: int = 64
  max_eval_examples: Optional[int] = None
  init_checkpoint: Optional[str] = None
  data_seed: int = 0

  def __post_init__(self):
    self._arrays = {}
    self._mesh = self._rules = None

  # ---- setup ----------------------------------------------------------------
  @functools.cached_property
  def vocab(self):
    vocab = vocab_lib.load_vocabulary(self.vocab_path)
    vocab_lib.check_model_tokens(vocab, self.model.config, "the model")
    return vocab

  def setup(self, mesh, rules):
    self._mesh, self._rules = mesh, rules
    if self.batch_size < 1 or self.batch_size % jax.process_count():
      raise UserError(f"batch_size {self.batch_size} must be >= 1 and divisible by "
                      f"{jax.process_count()} hosts")
    # NOTE: lazy: the task registry pulls in seqio and TensorFlow.
    from realign_jax.data import tasks  # pylint: disable=g-import-not-at-top
    if not self.train_file and tasks.task_features(self.task) != tasks.PREFERENCE_FEATURES:
      raise UserError(f"task {self.task} holds no preference pairs (features "
                      f"{tasks.task_features(self.task)}); use a preference task or train_file")
    if self.init_checkpoint:
      policy_lib.check_init_checkpoint(self.init_checkpoint, self.model.config)
    _ = self.vocab
    self.split_arrays("train")  # read and validate the training data before any compute

  def run_record(self) -> RunRecord:
    return RunRecord(model=self.model, vocab_path=self.vocab_path,
                     init_checkpoint=self.init_checkpoint, batch_size=self.batch_size)

  # ---- data -----------------------------------------------------------------
  def _rows(self, split: str) -> list:
    if self.train_file or self.eval_file:
      path = self.train_file if split == "train" else self.eval_file
      if not path:
        return []
      if not os.path.isfile(path):
        raise UserError(f"preference file {path} ({split} split) does not exist")
      rows, _ = preferences.load_preference_jsonl(path, skip_invalid=self.skip_invalid)
      return rows
    return pipeline.text_examples(self.task, split, data_dir=self.data_dir)

  def split_arrays(self, split: str) -> dict:
    """A whole split: {"inputs", "chosen", "rejected"} int32 arrays, the same on every host.

    NOTE: every host holds every pair (preference sets are small next to the
    model). A training batch is drawn from them as on one process and each
    host feeds its own rows of it (`batches`), so a run's batches, and its
    parameters, do not depend on the number of hosts; evaluation feeds the
    same whole batches on every host, which is what a jitted function over
    the global mesh expects of host data.
    """
    if split not in self._arrays:
      rows = self._rows(split)
      if split != "train" and self.max_eval_examples:
        rows = rows[:self.max_eval_examples]
      if not rows:
        if split == "train":
          raise UserError(f"no training preference pairs ({self.train_file or self.task})")
        self._arrays[split] = None
        return None
      arrays = pipeline.encode_batch(self.vocab, rows, input_length=self.input_length,
                                     target_length=self.target_length)
      same = int(np.sum(np.all(arrays["chosen"] == arrays["rejected"], axis=1)))
      if same:
        # NOTE: such pairs carry no signal (their loss has zero gradient), but
        # they are kept so the split's accuracy is over all of its pairs.
        logging.warning("%s split: %d of %d pairs have identical chosen and rejected tokens "
                        "after truncation to target_length %d", split, same, len(rows),
                        self.target_length)
      self._arrays[split] = arrays
    return self._arrays[split]

  def train_arrays(self) -> dict:
    """The arrays training batches are drawn from (row-aligned, leading dim = pairs)."""
    return self.split_arrays("train")

  def batches(self, start_step: int) -> Iterator[dict]:
    """The global batch of each step (as on one process), cut to this host's rows."""
    arrays = self.train_arrays()
    n = len(arrays["inputs"])
    rows = multihost.process_rows(self._mesh, self.batch_size)
    step = start_step
    while True:
      idx = pipeline.batch_indices(step, batch_size=self.batch_size, num_examples=n,
                                   seed=self.data_seed)[rows]
      yield {k: v[idx] for k, v in arrays.items()}
      step += 1

  def eval_batches(self, arrays: dict) -> Iterator[dict]:
    """Every pair once, the last batch padded with zero rows of weight 0."""
    n = len(arrays["inputs"])
    for start in range(0, n, self.eval_batch_size):
      size = min(self.eval_batch_size, n - start)
      batch = {}
      for k, v in arrays.items():
        part = np.full((self.eval_batch_size,) + v.shape[1:], self.model.config.tokens.pad_id,
                       v.dtype)
        part[:size] = v[start:start + size]
        batch[k] = part
      batch["weights"] = (np.arange(self.eval_batch_size) < size).astype(np.float32)
      yield batch

  def num_tokens(self, batch) -> int:
    pad = self.model.config.tokens.pad_id
    return int(sum(np.sum(np.asarray(batch[k]) != pad) for k in ("inputs", "chosen", "rejected")))


# ---- the reward model -------------------------------------------------------------
@dataclasses.dataclass
class RewardModel(PreferenceAlgorithm):
  """Bradley-Terry reward model: T5 or decoder-only with the scalar head.

  `model` must have output_head "scalar"; with INIT_CHECKPOINT an SFT run
  directory, the trunk starts from its params and the head from zeros.
  """

  dropout: bool = True  # dropout in training iff the model config has some
  name: str = "reward_model"

  def setup(self, mesh, rules):
    if self.model.output_head != "scalar":
      raise UserError(f"the reward model needs output_head 'scalar', got "
                      f"{self.model.output_head!r} (LanguageModel.output_head)")
    super().setup(mesh, rules)

  def init(self, rng):
    return self.model.init(rng)

  def initial_params(self, abstract_params):
    del abstract_params
    if not self.init_checkpoint:
      return None
    return load_trunk_params(self.init_checkpoint, self.model, self._mesh, self._rules)

  def loss(self, params, batch, rng, aux=None, frozen=None):
    del aux, frozen
    use_dropout = self.dropout and getattr(self.model.config, "dropout_rate", 0.0) > 0
    rc, rr = pair_rewards(self.model, params, batch, dropout_rng=rng if use_dropout else None)
    return jnp.mean(bradley_terry_losses(rc, rr)), preference_metrics(rc, rr)

  @functools.cached_property
  def _eval_fn(self):
    def fn(params, batch):
      rc, rr = pair_rewards(self.model, params, batch)
      w = batch["weights"]
      return {"loss_sum": jnp.sum(bradley_terry_losses(rc, rr) * w), "count": jnp.sum(w),
              "correct": jnp.sum((rc > rr) * w), "margin_sum": jnp.sum((rc - rr) * w),
              "reward_sum": jnp.sum(0.5 * (rc + rr) * w)}
    return jax.jit(fn)

  def evaluate(self, params, step, aux=None):
    del step, aux
    arrays = self.split_arrays(self.eval_split)
    if arrays is None:
      return {}, []
    sums = {}
    for batch in self.eval_batches(arrays):
      out = multihost.fetch(self._eval_fn(params, {k: jnp.asarray(v) for k, v in batch.items()}))
      for k, v in out.items():
        sums[k] = sums.get(k, 0.0) + float(v)
    n = max(sums["count"], 1.0)
    return {"loss": sums["loss_sum"] / n, "accuracy": sums["correct"] / n,
            "margin": sums["margin_sum"] / n, "reward_mean": sums["reward_sum"] / n,
            "pairs": sums["count"]}, []
