"""The safetensors file format, read and written directly with numpy.

A file is an 8-byte little-endian header length, a JSON header (tensor name
-> {"dtype", "shape", "data_offsets"}, plus an optional "__metadata__" map)
and the raw little-endian data. The `safetensors` numpy backend cannot
represent bfloat16, which most released checkpoints use, so this codec reads
and writes every dtype through one code path (bfloat16 as
`ml_dtypes.bfloat16`). Reading memory-maps the file: a tensor's data is only
read when it is used.
"""

import json
import math
import os
from typing import NamedTuple, Optional

import ml_dtypes
import numpy as np

from realign_jax.plumbing.errors import UserError

# safetensors dtype tag <-> numpy dtype (always little-endian on disk).
_ST_TO_NP = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("bool"),
}
_NP_TO_ST = {v: k for k, v in _ST_TO_NP.items()}
FLOAT_TAGS = ("F64", "F32", "F16", "BF16")
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # NOTE: the limit the reference reader enforces too.


class Entry(NamedTuple):
  """One tensor's header record inside a safetensors file."""

  file: str
  dtype: str  # safetensors tag, e.g. "BF16"
  shape: tuple
  start: int  # absolute byte offsets in the file
  end: int


def read_header(path: str) -> dict[str, Entry]:
  """Parses a safetensors header; validates offsets against the file size."""
  try:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      raw_len = f.read(8)
      if len(raw_len) != 8:
        raise UserError(f"{path}: not a safetensors file (shorter than 8 bytes)")
      n = int.from_bytes(raw_len, "little")
      if n > _MAX_HEADER_BYTES or 8 + n > size:
        raise UserError(f"{path}: not a safetensors file (header length {n}, file size {size})")
      header = json.loads(f.read(n).decode("utf-8"))
  except FileNotFoundError:
    raise UserError(f"safetensors file not found: {path}") from None
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise UserError(f"{path}: unreadable safetensors header ({e})") from None
  if not isinstance(header, dict):
    raise UserError(f"{path}: safetensors header is not a JSON object")
  base = 8 + n
  entries = {}
  for name, rec in header.items():
    if name == "__metadata__":
      continue
    try:
      tag, shape, (lo, hi) = rec["dtype"], tuple(int(s) for s in rec["shape"]), rec["data_offsets"]
    except (KeyError, TypeError, ValueError):
      raise UserError(f"{path}: malformed header record for tensor {name!r}: {rec!r}") from None
    if tag not in _ST_TO_NP:
      raise UserError(f"{path}: tensor {name!r} has unsupported dtype {tag!r} "
                      f"(supported: {', '.join(_ST_TO_NP)})")
    want = math.prod(shape) * _ST_TO_NP[tag].itemsize
    if not 0 <= lo <= hi or hi - lo != want or base + hi > size:
      raise UserError(f"{path}: tensor {name!r} has data_offsets [{lo}, {hi}] inconsistent with "
                      f"dtype {tag} shape {list(shape)} ({want} bytes) or the file size {size}")
    entries[name] = Entry(path, tag, shape, base + lo, base + hi)
  return entries


def read_entry(entry: Entry, mm: Optional[np.ndarray] = None) -> np.ndarray:
  """A read-only view of one tensor's data (memory-mapped, not copied).

  Args:
    entry: the tensor's header record (`read_header`).
    mm: the file already memory-mapped as uint8 (shared by many reads), or
      None to map it here.
  """
  if mm is None:
    mm = np.memmap(entry.file, dtype=np.uint8, mode="r")
  return mm[entry.start:entry.end].view(_ST_TO_NP[entry.dtype]).reshape(entry.shape)


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Reads every tensor of a safetensors file (any dtype, bfloat16 included).

  Args:
    path: a `.safetensors` file.

  Returns:
    name -> numpy array (a copy, native byte order; bfloat16 as
    `ml_dtypes.bfloat16`).
  """
  entries = read_header(path)
  mm = np.memmap(path, dtype=np.uint8, mode="r") if entries else None
  return {name: np.array(read_entry(e, mm)) for name, e in entries.items()}


def write_safetensors(path: str, tensors: dict[str, np.ndarray],
                      metadata: Optional[dict[str, str]] = None) -> None:
  """Writes `tensors` as one safetensors file (not atomic; see `hf.export`).

  Args:
    path: destination file.
    tensors: name -> array of a dtype safetensors knows (bfloat16 included).
    metadata: optional string -> string map stored under "__metadata__"
      (HF transformers wants {"format": "pt"}).
  """
  arrays, header, offset = [], {}, 0
  for name in sorted(tensors):
    a = np.asarray(tensors[name])
    if a.dtype.byteorder == ">":
      a = a.astype(a.dtype.newbyteorder("<"))
    if a.dtype not in _NP_TO_ST:
      raise ValueError(f"tensor {name!r}: dtype {a.dtype} has no safetensors equivalent")
    tag = _NP_TO_ST[a.dtype]
    a = np.ascontiguousarray(a, dtype=_ST_TO_NP[tag])
    header[name] = {"dtype": tag, "shape": list(a.shape),
                    "data_offsets": [offset, offset + a.nbytes]}
    offset += a.nbytes
    arrays.append(a)
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
  # NOTE: space padding keeps the data 8-byte aligned, as the reference writer does.
  raw += b" " * (-len(raw) % 8)
  with open(path, "wb") as f:
    f.write(len(raw).to_bytes(8, "little"))
    f.write(raw)
    for a in arrays:
      f.write(a.reshape(-1).view(np.uint8).data)
