"""Supervised fine-tuning: teacher-forced cross-entropy, padding masked."""

import dataclasses
import functools
from typing import Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np

from realign_jax.checkpoints import manager as ckpt_lib
from realign_jax.checkpoints.run_dir import RunRecord
from realign_jax.data import pipeline
from realign_jax.data import vocab as vocab_lib
from realign_jax.decoding import sampler
from realign_jax.plumbing.errors import UserError
from realign_jax.models.api import LanguageModel
from realign_jax.parallel import multihost
from realign_jax.training.trainer import Algorithm


def token_logprobs(logits, targets):
  """log p(targets[t]) per position: [B, T, V], [B, T] -> [B, T] float32."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def cross_entropy(logits, targets, weights=None, pad_id: int = sampler.PAD_ID):
  """Mean negative log-likelihood over real (non-pad) target tokens.

  Returns (mean loss, number of tokens). `weights` [B] masks whole rows;
  `pad_id` is the model's (`config.tokens.pad_id`).
  """
  mask = (targets != pad_id).astype(jnp.float32)
  if weights is not None:
    mask = mask * weights[:, None]
  nll = -token_logprobs(logits, targets) * mask
  n = jnp.sum(mask)
  return jnp.sum(nll) / jnp.maximum(n, 1.0), n


@dataclasses.dataclass
class SFT(Algorithm):
  """Supervised fine-tuning of a T5 or decoder-only model on (inputs, targets)."""

  model: LanguageModel
  task: str = "builtin_summarize"
  batch_size: int = 32
  input_length: int = 128
  target_length: int = 32
  data_dir: Optional[str] = None
  vocab_path: Optional[str] = None
  eval_split: str = "validation"
  eval_batch_size: int = 64
  max_eval_examples: Optional[int] = None
  num_eval_samples: int = 3
  init_checkpoint: Optional[str] = None
  data_seed: int = 0
  name: str = "sft"

  def __post_init__(self):
    self._vocab = None

  # ---- setup ----------------------------------------------------------------
  @property
  def vocab(self):
    if self._vocab is None:
      vocab = vocab_lib.load_vocabulary(self.vocab_path)
      vocab_lib.check_model_tokens(vocab, self.model.config, "the model")
      self._vocab = vocab
    return self._vocab

  def setup(self, mesh, rules):
    del rules
    self._mesh = mesh
    _ = self.vocab
    if self.batch_size % jax.process_count():
      raise UserError(f"batch_size {self.batch_size} not divisible by {jax.process_count()} hosts")

  def run_record(self) -> RunRecord:
    return RunRecord(model=self.model, vocab_path=self.vocab_path,
                     init_checkpoint=self.init_checkpoint, batch_size=self.batch_size)

  def init(self, rng):
    return self.model.init(rng)

  def initial_params(self, abstract_params):
    if not self.init_checkpoint:
      return None
    return ckpt_lib.load_params(self.init_checkpoint, abstract_params)

  # ---- data -----------------------------------------------------------------
  def batches(self, start_step: int) -> Iterator[dict]:
    # NOTE: every process reads the same global batch and keeps the rows its
    # devices hold, so the data does not depend on the number of hosts.
    it = pipeline.batch_iterator(
        self.task, "train", batch_size=self.batch_size,
        input_length=self.input_length, target_length=self.target_length,
        seed=self.data_seed, shuffle=True, repeat=True, data_dir=self.data_dir,
        vocab_path=self.vocab_path, start_step=start_step)
    return multihost.host_rows(it, self._mesh, self.batch_size)

  # ---- loss -----------------------------------------------------------------
  def loss(self, params, batch, rng, aux=None, frozen=None):
    del aux, frozen
    use_dropout = getattr(self.model.config, "dropout_rate", 0.0) > 0
    out = self.model.forward(params, batch["inputs"], batch["targets"],
                             dropout_rng=rng if use_dropout else None)
    loss, n = cross_entropy(out["logits"], batch["targets"],
                            pad_id=self.model.config.tokens.pad_id)
    return loss, {"target_tokens": n}

  # ---- eval -----------------------------------------------------------------
  @functools.cached_property
  def _eval_fns(self):
    def eval_loss(params, batch):
      out = self.model.forward(params, batch["inputs"], batch["targets"])
      mask = (batch["targets"] != self.model.config.tokens.pad_id) * batch["weights"][:, None]
      nll = -token_logprobs(out["logits"], batch["targets"]) * mask
      return jnp.sum(nll), jnp.sum(mask)

    cfg = sampler.SamplingConfig(max_new_tokens=self.target_length, greedy=True)
    gen = functools.partial(sampler.generate, self.model, config=cfg)
    return jax.jit(eval_loss), jax.jit(gen)

  def evaluate(self, params, step, aux=None):
    del aux
    eval_loss, gen = self._eval_fns
    total, count = 0.0, 0.0
    for batch in pipeline.eval_batches(
        self.task, self.eval_split, batch_size=self.eval_batch_size,
        input_length=self.input_length, target_length=self.target_length,
        data_dir=self.data_dir, vocab_path=self.vocab_path, limit=self.max_eval_examples):
      s, n = eval_loss(params, {k: jnp.asarray(v) for k, v in batch.items()})
      total += float(s)
      count += float(n)
    metrics = {"loss": total / max(count, 1.0), "target_tokens": count}
    samples = []
    if self.num_eval_samples:
      ex = pipeline.text_examples(self.task, self.eval_split, data_dir=self.data_dir,
                                  limit=self.num_eval_samples)
      inputs = pipeline.encode_batch(self.vocab, ex, input_length=self.input_length,
                                     target_length=self.target_length)["inputs"]
      out = gen(params, jnp.asarray(inputs), jax.random.PRNGKey(step))
      for e, toks in zip(ex, np.asarray(out.tokens)):
        samples.append({"prompt": e["inputs"][:300], "reference": e["targets"],
                        "sample": vocab_lib.decode(self.vocab, toks.tolist())})
    return metrics, samples
