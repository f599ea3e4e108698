"""Preference pairs: the {prompt, chosen, rejected} schema and its files.

A preference file is JSON lines, one object per line with three non-empty
strings `prompt`, `chosen` and `rejected` (chosen != rejected); other fields
are ignored. Rows are numbered from 1 by line in error messages.
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from typing import Any, Iterable, Mapping

from absl import logging

from realign_jax.data import tldr
from realign_jax.plumbing.errors import UserError

FIELDS = ("prompt", "chosen", "rejected")


def validate_preference(row: Any, *, where: str) -> dict[str, str]:
  """Checks one preference row.

  Args:
    row: the parsed row.
    where: where the row comes from, e.g. "prefs.jsonl row 3".

  Returns:
    {"prompt", "chosen", "rejected"}.

  Raises:
    UserError: a field is missing, not a string or empty, or chosen equals
      rejected; the message starts with `where`.
  """
  if not isinstance(row, Mapping):
    raise UserError(f"{where}: expected a JSON object with fields "
                    f"{', '.join(FIELDS)}")
  for field in FIELDS:
    if field not in row:
      raise UserError(f"{where}: missing field {field!r}")
    if not isinstance(row[field], str):
      raise UserError(f"{where}: field {field!r} is not a string")
    if not row[field].strip():
      raise UserError(f"{where}: field {field!r} is empty")
  if row["chosen"] == row["rejected"]:
    raise UserError(f"{where}: 'chosen' and 'rejected' are identical")
  return {field: row[field] for field in FIELDS}


def load_preference_jsonl(
    path: str | os.PathLike[str], *, skip_invalid: bool = False,
) -> tuple[list[dict[str, str]], int]:
  """Reads a preference JSONL file.

  Args:
    path: the file.
    skip_invalid: skip (and count) invalid rows instead of raising.

  Returns:
    (rows, number of skipped rows).

  Raises:
    UserError: the file cannot be read or is not UTF-8, or (unless
      skip_invalid) a row is not JSON or fails `validate_preference`; the
      message names the file and the 1-based row.
  """
  path = pathlib.Path(path)
  try:
    text = path.read_text(encoding="utf-8")
  except OSError as e:
    raise UserError(f"cannot read preference file {path}: {e.strerror}") from e
  except UnicodeDecodeError as e:
    raise UserError(f"preference file {path} is not UTF-8 text") from e
  rows, skipped = [], 0
  for number, line in enumerate(text.splitlines(), start=1):
    if not line.strip():
      continue
    where = f"{path} row {number}"
    try:
      try:
        parsed = json.loads(line)
      except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg})") from e
      rows.append(validate_preference(parsed, where=where))
    except UserError:
      if not skip_invalid:
        raise
      skipped += 1
  if skipped:
    logging.warning("%s: skipped %d invalid rows", path, skipped)
  return rows, skipped


def write_preference_jsonl(path: str | os.PathLike[str],
                           rows: Iterable[Mapping[str, str]]) -> int:
  """Writes preference rows atomically (temp file, then `os.replace`).

  Args:
    path: the output file; its directory is created if needed.
    rows: rows with fields prompt, chosen, rejected (others are dropped).

  Returns:
    The number of rows written.

  Raises:
    UserError: a row fails `validate_preference` (nothing is written).
  """
  path = pathlib.Path(path)
  lines = []
  for index, row in enumerate(rows, start=1):
    clean = validate_preference(row, where=f"row {index} written to {path}")
    lines.append(json.dumps(clean, ensure_ascii=False) + "\n")
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                             suffix=".tmp")
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.writelines(lines)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return len(lines)


def comparison_to_preference(row: Any, *, where: str) -> dict[str, str]:
  """Converts one TL;DR comparison row to {prompt, chosen, rejected}.

  The chosen summary is `summaries[choice]`; texts are stripped of the
  leading space that follows "TL;DR:" upstream.

  Args:
    row: a parsed line of a comparisons `batch*.json` file.
    where: where the row comes from, for error messages.

  Returns:
    The preference row.

  Raises:
    UserError: the row lacks info.post/title/subreddit, two summaries with a
      text, or a choice of 0 or 1, or fails `validate_preference`.
  """
  if not isinstance(row, Mapping):
    raise UserError(f"{where}: expected a JSON object")
  info = row.get("info")
  if not isinstance(info, Mapping):
    raise UserError(f"{where}: missing field 'info'")
  for field in ("post", "title", "subreddit"):
    if not isinstance(info.get(field), str):
      raise UserError(f"{where}: field 'info.{field}' is missing or not a "
                      "string")
  summaries = row.get("summaries")
  if (not isinstance(summaries, list) or len(summaries) != 2 or not all(
      isinstance(s, Mapping) and isinstance(s.get("text"), str)
      for s in summaries)):
    raise UserError(f"{where}: field 'summaries' must be two objects with a "
                    "string 'text'")
  choice = row.get("choice")
  if isinstance(choice, bool) or choice not in (0, 1):
    raise UserError(f"{where}: field 'choice' must be 0 or 1, got {choice!r}")
  prompt = tldr.tldr_prompt(subreddit=info["subreddit"], title=info["title"],
                            post=info["post"])
  return validate_preference(
      {"prompt": prompt, "chosen": summaries[choice]["text"].strip(),
       "rejected": summaries[1 - choice]["text"].strip()}, where=where)


def load_tldr_comparisons(
    data_dir: str | os.PathLike[str], split: str, *,
    skip_invalid: bool = False,
) -> tuple[list[dict[str, str]], int]:
  """Reads one split of the TL;DR comparisons as preference rows.

  Args:
    data_dir: directory of `batch*.json` files.
    split: "train", "validation" (valid1) or "test" (valid2).
    skip_invalid: skip (and count) invalid rows instead of raising; lines
      that are not JSON always raise.

  Returns:
    (rows in file order, number of skipped rows).
  """
  rows, skipped = [], 0
  for where, row in tldr.iter_comparison_rows(data_dir, split):
    try:
      rows.append(comparison_to_preference(row, where=where))
    except UserError:
      if not skip_invalid:
        raise
      skipped += 1
  if skipped:
    logging.warning("TL;DR comparisons %s split %s: skipped %d invalid rows",
                    data_dir, split, skipped)
  return rows, skipped
