"""Output heads shared by both families.

`OUTPUT_HEADS`:
  "lm"         next-token logits [B, T, V] (float32);
  "scalar"     one value per position [B, T] (float32): value models, and
               reward models read it at the last real position;
  "lm+scalar"  both, for a policy with a value head sharing its trunk.
  "lm+scalar:dueling"
               both, read by CD-Q as a dueling Q-function: the scalar is V(s),
               the logits are advantages A(s, z), and
               Q(s, z) = V(s) + A(s, z) - sum_z' p(z' | s) A(s, z')
               (training/value.py, decoding/controlled.py).
"""

import flax.linen as nn
import jax.numpy as jnp

from realign_jax.models import layers

DUELING_Q = "lm+scalar:dueling"
OUTPUT_HEADS = ("lm", "scalar", "lm+scalar", DUELING_Q)


class ScalarHead(nn.Module):
  """Linear map of the final hidden state to a scalar: [B, T, E] -> [B, T]."""

  dtype: object = jnp.float32
  param_dtype: object = jnp.float32

  @nn.compact
  def __call__(self, h):
    kernel = self.param("kernel", layers.logical(nn.initializers.zeros, ("embed",)),
                        (h.shape[-1],), self.param_dtype)
    bias = self.param("bias", layers.logical(nn.initializers.zeros, ()), (), self.param_dtype)
    return jnp.einsum("bte,e->bt", h.astype(jnp.float32), kernel.astype(jnp.float32)) + bias


def check_output_head(name: str) -> str:
  if name not in OUTPUT_HEADS:
    raise ValueError(f"output_head must be one of {OUTPUT_HEADS}, got {name!r}")
  return name


def last_position_values(values, mask):
  """Reads per-sequence scalars at the last real position.

  Args:
    values: [B, T] per-position scalars.
    mask: [B, T] bool or 0/1, True at real (non-pad) positions.

  Returns:
    [B] the value at the last position where mask is set (position 0 if none).
  """
  mask = mask.astype(jnp.int32)
  t = values.shape[1]
  last = jnp.max(jnp.where(mask > 0, jnp.arange(t)[None, :], 0), axis=1)
  return jnp.take_along_axis(values, last[:, None], axis=1)[:, 0]
