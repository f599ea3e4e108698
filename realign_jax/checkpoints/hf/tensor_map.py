"""One HF tensor <-> one leaf of our params: names, layout and dtype.

Layout conversion. HF linear weights are [out, in]; our kernels are
[in, out] with DenseGeneral head splitting, so a weight is transposed and its
out axis reshaped: q/k/v [H*D, E] -> [E, H, D], o [E, H*D] -> [H, D, E].
Nothing else changes: T5 has no 1/sqrt(D) in attention in either codebase,
and our RoPE uses the rotate-half layout of the HF Llama weights, so q/k need
no permutation. Each family's map (`t5.py`, `llama.py`) is a list of
`Tensor`s built with `copy` and `linear`.
"""

from typing import Any, Callable, NamedTuple, Optional

import jax
import ml_dtypes
import numpy as np

Params = Any

# The param dtypes a checkpoint is imported in or exported from, by name.
PARAM_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
                "float16": np.dtype(np.float16)}


class Tensor(NamedTuple):
  """One HF tensor and the param leaf it becomes."""

  hf_name: str
  path: tuple  # keys into our params tree
  hf_shape: tuple
  shape: tuple  # our param shape
  linear: bool  # HF [out, in] weight -> our [in, out...] kernel


class Extra(NamedTuple):
  """A stored tensor the model does not use, accepted and ignored."""

  match: Callable[[str], bool]
  shape: Optional[tuple]  # required shape, None for any
  copy_of: Optional[str] = None  # it must then equal this (tied) tensor, as HF ties them


def copy(hf_name, path, shape) -> Tensor:
  """A tensor stored as the leaf is (embeddings, norm scales, bias tables)."""
  return Tensor(hf_name, path, tuple(shape), tuple(shape), False)


def linear(hf_name, path, hf_shape, shape) -> Tensor:
  """An HF [out, in] weight that becomes our [in, out...] kernel."""
  return Tensor(hf_name, path, tuple(hf_shape), tuple(shape), True)


def to_param(t: Tensor, w: np.ndarray, dtype: np.dtype) -> np.ndarray:
  """The param leaf of the stored tensor `w`, in `dtype`."""
  if t.linear:
    # [out, in] -> [in, out] -> split out into e.g. (heads, head_dim); one copying pass.
    return np.array(w.T, dtype=dtype, order="C").reshape(t.shape)
  return np.array(w, dtype=dtype, order="C")


def from_param(t: Tensor, p: np.ndarray) -> np.ndarray:
  """The HF tensor of the param leaf `p` (dtype kept)."""
  if t.linear:
    n_in = t.hf_shape[1]
    return np.ascontiguousarray(p.reshape(n_in, -1).T)
  return np.ascontiguousarray(p)


def set_leaf(tree: dict, path: tuple, value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def get_leaf(tree: Any, path: tuple):
  for key in path:
    tree = tree[key]
  return tree


def tree_diff(got: Params, want: Params) -> list[str]:
  """Human-readable differences in structure or leaf shapes of two param trees."""
  flat_got = {jax.tree_util.keystr(k): np.shape(v)
              for k, v in jax.tree_util.tree_flatten_with_path(got)[0]}
  flat_want = {jax.tree_util.keystr(k): tuple(v.shape)
               for k, v in jax.tree_util.tree_flatten_with_path(want)[0]}
  diff = [f"missing {k}" for k in sorted(flat_want.keys() - flat_got.keys())]
  diff += [f"unexpected {k}" for k in sorted(flat_got.keys() - flat_want.keys())]
  diff += [f"{k}: shape {flat_got[k]} != {flat_want[k]}"
           for k in sorted(flat_got.keys() & flat_want.keys()) if flat_got[k] != flat_want[k]]
  if not diff and jax.tree.structure(got) != jax.tree.structure(want):
    diff.append(f"tree structure {jax.tree.structure(got)} != {jax.tree.structure(want)}")
  return diff
