"""DeRa (Liu et al. 2024): a lambda sweep mixing a reference and aligned model(s).

  decode.method = @DeRa()
  DeRa.aligned_checkpoint = 'runs/ppo'
  DeRa.lambdas = [0.0, 0.5, 1.0, 2.0]

One row per (prompt, sample, lambda); weight mixing decodes one program per
lambda, logit mixing all lambdas in one batched call (`dera.dera_sweep`).
"""

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from realign_jax.checkpoints import run_dir
from realign_jax.data import vocab as vocab_lib
from realign_jax.decoding import dera
from realign_jax.decoding.lambda_grid import LambdaGrid
from realign_jax.plumbing.errors import UserError
from realign_jax.inference.method import Context, DecodeMethod, Runner, check_same_tokens
from realign_jax.inference.method import row_ids

MIXINGS = ("logits", "weights")


@dataclasses.dataclass
class DeRa(DecodeMethod):
  """DeRa: `lambdas` (default [1.0]) with one `aligned_checkpoint` (or none: the reference alone).

  `mixing` 'logits' or 'weights'; or, for several aligned models (Appendix B
  of the paper), `aligned_checkpoints` [M] with `lambda_vectors` [K][M] (one
  weight per aligned model): row k samples
  softmax(sum_i lam_ki h_i + (1 - sum_i lam_ki) h_ref), all K in one batched
  call (logit mixing only).
  """
  lambdas: Optional[Sequence[float]] = None
  aligned_checkpoint: Optional[str] = None
  mixing: str = "logits"
  aligned_checkpoints: Optional[Sequence[str]] = None
  lambda_vectors: Optional[Sequence[Sequence[float]]] = None

  name = "dera"

  def __post_init__(self):
    self._checked = None  # (aligned dirs, lambdas or vectors, multi) once checked

  def _settings(self):
    if self._checked is None:
      if self.mixing not in MIXINGS:
        raise UserError(f"DeRa.mixing must be one of {MIXINGS}, got {self.mixing!r}")
      multi = self.aligned_checkpoints is not None
      if multi:
        dirs, lambdas = _check_multi(self.aligned_checkpoint, self.aligned_checkpoints,
                                     self.lambdas, self.lambda_vectors, self.mixing)
      else:
        if self.lambda_vectors is not None:
          raise UserError("DeRa.lambda_vectors weighs several aligned models: give them as "
                          "DeRa.aligned_checkpoints (or use DeRa.lambdas with one "
                          "aligned_checkpoint)")
        lambdas = LambdaGrid.of((1.0,) if self.lambdas is None else self.lambdas,
                                "DeRa.lambdas").list()
        dirs = [self.aligned_checkpoint] if self.aligned_checkpoint else []
      self._checked = (dirs, lambdas, multi)
    return self._checked

  def checked_lambdas(self) -> list:
    return self._settings()[1]

  def components(self) -> dict:
    return {f"aligned{i}": (d, "policy") for i, d in enumerate(self._settings()[0])}

  def check(self, ctx: Context) -> None:
    dirs, _, _ = self._settings()
    ref_cfg = ctx.ref_cfg
    for aligned_dir in dirs:  # NOTE: every aligned model, before any params are read
      al_cfg, _ = run_dir.read_model_json(aligned_dir)
      if al_cfg.vocab_size != ref_cfg.vocab_size:
        raise UserError(f"reference and aligned models have different vocabulary sizes: "
                        f"{ref_cfg.vocab_size} ({ctx.ref_checkpoint}) vs {al_cfg.vocab_size} "
                        f"({aligned_dir})")
      check_same_tokens(ref_cfg, ctx.ref_checkpoint, al_cfg, aligned_dir)

  def runners(self, comps, rewards, sampling, num_samples):
    """Rows (b, j, k) of one runner, or one runner per lambda (weight mixing)."""
    dirs, lambdas, multi = self._settings()
    ref, n, cfg = comps["ref"], num_samples, sampling
    aligned = [comps[f"aligned{i}"] for i in range(len(dirs))]
    if self.mixing == "weights" and aligned:
      dera.check_same_architecture(aligned[0].params, ref.params)
    if multi:
      lam_vecs = jnp.asarray(lambdas, jnp.float32)  # [K, M]
      return [Runner(jax.jit(lambda x, s, r: dera.multi_sweep(ref, aligned, x, lam_vecs, r, cfg,
                                                              seeds=s, num_samples=n)))]
    if not aligned:
      def run(inputs, seeds, rng):
        return dera.sample_mixture([ref], jnp.ones((1,)), inputs, rng, cfg, num_samples=n,
                                   row_ids=row_ids(seeds, n), reference_index=0)
      return [Runner(jax.jit(run))]
    al = aligned[0]
    if self.mixing == "logits":
      lam = jnp.asarray(lambdas, jnp.float32)
      return [Runner(jax.jit(lambda x, s, r: dera.dera_sweep(ref, al, x, lam, r, cfg, seeds=s,
                                                             num_samples=n)))]
    # Weight mixing: one model per lambda; the reference and aligned models ride
    # along with weight 0 so each token's log-probs and the KL come out of the same loop.
    out = []
    for lam in lambdas:
      mixed = dera.Component(ref.lm, dera.mix_weights(al.params, ref.params, lam))

      def run(inputs, seeds, rng, mixed=mixed):
        return dera.sample_mixture([mixed, ref, al], jnp.array([1.0, 0.0, 0.0]), inputs, rng,
                                   cfg, num_samples=n, row_ids=row_ids(seeds, n),
                                   reference_index=1)
      out.append(Runner(jax.jit(run), key=lam))
    return out

  def rows(self, batch, prompts, vocab, n, seed, sampling):
    dirs, lambdas, multi = self._settings()
    has_aligned = bool(dirs)
    lam_list = lambdas if has_aligned else [None]
    per_lambda = len(batch.outs) > 1  # weight mixing: one output per lambda
    rows = []
    for bi, p_idx in enumerate(batch.idx):
      for j in range(n):
        for lam_pos, lam in enumerate(lam_list):
          if per_lambda:
            out, r = batch.outs[lam_pos], bi * n + j
          else:
            out, r = batch.outs[0], (bi * n + j) * len(lam_list) + lam_pos
          rows.append(self._row(out, r, prompts[p_idx], p_idx, j, lam, vocab, n, seed, sampling,
                                has_aligned, multi))
    return rows

  def _row(self, out, r, prompt, p_idx, j, lam, vocab, n, seed, sampling, has_aligned,
           multi) -> dict:
    mixing = self.mixing
    length = int(out.lengths[r])
    comp = out.model_logprobs[:, r, :length]
    ref_lp = comp[0] if mixing == "logits" or not has_aligned else comp[1]
    if sampling.greedy:
      # NOTE: greedy decoding samples a point mass per step, not softmax
      # of the mixed logits: log q = 0 and KL(q || p_ref) = -log p_ref(y_t),
      # as every other method's greedy rows.
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
        "prompt": prompt, "response": vocab_lib.decode(vocab, out.tokens[r].tolist()),
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
    return row

  def summary(self, rows):
    return {"lambdas": self.checked_lambdas(),
            "mean_kl": float(np.mean(np.array([r["kl"] for r in rows])))}


def _check_multi(aligned_checkpoint, aligned_checkpoints, lambdas, lambda_vectors,
                 mixing) -> tuple:
  """(aligned run directories, weight vectors) of multi-model DeRa, or a one-line UserError."""
  if aligned_checkpoint:
    raise UserError("give DeRa.aligned_checkpoint (one aligned model, with lambdas) or "
                    "DeRa.aligned_checkpoints (several, with lambda_vectors), not both")
  if (isinstance(aligned_checkpoints, (str, bytes)) or not aligned_checkpoints
      or not all(isinstance(d, str) and d for d in aligned_checkpoints)):
    raise UserError(f"DeRa.aligned_checkpoints must be a non-empty list of run directories, "
                    f"got {aligned_checkpoints!r}")
  if lambdas is not None:
    raise UserError("with aligned_checkpoints the weights are DeRa.lambda_vectors (one "
                    "weight per aligned model per row), not DeRa.lambdas")
  if lambda_vectors is None:
    raise UserError(f"aligned_checkpoints needs DeRa.lambda_vectors: a list of weight lists, "
                    f"each with {len(aligned_checkpoints)} weights (one per aligned model)")
  if mixing != "logits":
    # NOTE: Appendix B mixes logits; weight mixing is defined here for one aligned model.
    raise UserError(f"several aligned models are mixed in logits only (mixing='logits'), got "
                    f"mixing={mixing!r}")
  return list(aligned_checkpoints), dera.check_lambda_vectors(lambda_vectors,
                                                              len(aligned_checkpoints))
