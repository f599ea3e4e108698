"""JSON lines files (one object per non-blank line) and Hugging Face datasets'
shard files (parquet or JSON lines); errors name the file and the row.

The JSON and JSON-lines readers also take gs:// URIs (`realign_jax.plumbing.paths`);
shard directories are local (a hub download)."""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Iterator, Sequence

from realign_jax.plumbing import paths
from realign_jax.plumbing.errors import UserError


def read_json_object(path: str | os.PathLike[str]) -> dict:
  """A JSON file holding one object (a tokenizer's config files); a UserError naming the file."""
  try:
    with paths.open(path) as f:
      doc = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
  if not isinstance(doc, dict):
    raise UserError(f"{path} does not hold a JSON object")
  return doc


def iter_json_lines(path: str | os.PathLike[str]) -> Iterator[tuple[int, Any]]:
  """Yields (1-based line number, parsed JSON) of the non-blank lines."""
  try:
    f = paths.open(path)
  except OSError as e:
    # NOTE: epath's errors on a URI carry a message, not an errno's text
    raise UserError(f"cannot read {path}: {e.strerror or str(e).splitlines()[0]}") from e
  with f:
    try:
      for number, line in enumerate(f, start=1):
        if not line.strip():
          continue
        try:
          yield number, json.loads(line)
        except json.JSONDecodeError as e:
          raise UserError(
              f"{path} row {number}: not valid JSON ({e.msg})") from e
    except UnicodeDecodeError as e:
      raise UserError(f"{path}: not valid UTF-8 text") from e


# ---- Hugging Face datasets' shard files ------------------------------------------------
# A split as the Hugging Face Hub publishes it and `huggingface-cli download`
# stores it: parquet shards (`data/train-00000-of-00002.parquet`, or the
# converted layout `default/train/0000.parquet`) or JSON-lines files
# (`train.jsonl`, `validation-00000-of-00001.json`, as `Dataset.to_json`
# writes them).

HF_EXTENSIONS = (".parquet", ".jsonl", ".json")
# Canonical split -> the names the published datasets use for it.
HF_SPLIT_NAMES = {"train": ("train",), "validation": ("validation", "valid", "val"),
                  "test": ("test",)}


def _split_of(path: pathlib.Path, root: pathlib.Path) -> str | None:
  """The canonical split a shard file belongs to, from its name or its folder."""
  stem = path.name[:-len(path.suffix)]
  candidates = [stem, stem.split("-", 1)[0]]
  if path.parent != root:
    candidates.append(path.parent.name)
  for split, names in HF_SPLIT_NAMES.items():
    if any(c in names for c in candidates):
      return split
  return None


def hf_shard_files(data_dir: str | os.PathLike[str]) -> dict[str, list[pathlib.Path]]:
  """Canonical split -> its sorted shard files (parquet or JSON lines) under `data_dir`.

  Hidden folders (e.g. `.cache` of a hub download) are passed over.
  """
  root = pathlib.Path(data_dir)
  out: dict[str, list[pathlib.Path]] = {}
  for path in sorted(root.rglob("*")):
    rel = path.relative_to(root).parts
    if any(p.startswith(".") for p in rel) or not path.is_file():
      continue
    if path.suffix not in HF_EXTENSIONS:
      continue
    split = _split_of(path, root)
    if split is not None:
      out.setdefault(split, []).append(path)
  return out


def iter_hf_rows(path: str | os.PathLike[str], columns: Sequence[str]
                 ) -> Iterator[tuple[str, dict[str, Any]]]:
  """Yields ("FILE row N", row) of one shard; every row has `columns`.

  A parquet file's schema is checked first: a missing column is one
  UserError naming the file and the column. JSON-lines rows are checked one
  by one (the row number is named too).
  """
  path = pathlib.Path(path)
  if path.suffix == ".parquet":
    import pyarrow  # pylint: disable=g-import-not-at-top
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    try:
      pfile = pq.ParquetFile(path)
    except (OSError, pyarrow.ArrowException) as e:
      raise UserError(f"cannot read {path} as parquet: {str(e).splitlines()[0]}") from None
    names = pfile.schema_arrow.names
    for column in columns:
      if column not in names:
        raise UserError(f"{path}: missing column {column!r} (columns: {', '.join(names)})")
    number = 0
    for batch in pfile.iter_batches(columns=list(columns)):
      for row in batch.to_pylist():
        number += 1
        yield f"{path} row {number}", row
    return
  for number, row in iter_json_lines(path):
    where = f"{path} row {number}"
    if not isinstance(row, dict):
      raise UserError(f"{where}: expected a JSON object")
    for column in columns:
      if column not in row:
        raise UserError(f"{where}: missing column {column!r}")
    yield where, row
