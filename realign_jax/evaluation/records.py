"""Decode JSONL files (written by `realign_jax.decode`) read and checked for evaluation.

Every row must carry a non-empty string `prompt`, a string `response` (possibly
empty), and, where KL is asked for, finite numbers `kl` and `log_ratio`.
`lam` (null, a finite number, or a list of them: the weight vector of
multi-model DeRa, grouped as a tuple) groups the rows; `prompt_index` and `sample`,
when present, identify a row within its group (otherwise its position does).
Errors name the file and the 1-based line. The file may be a gs:// URI
(`realign_jax.plumbing.paths`), as the decode binary may write it there.
"""

import json
import math
from typing import Any, Optional, Sequence

from realign_jax.plumbing import paths
from realign_jax.decoding.lambda_grid import LambdaGrid
from realign_jax.plumbing.errors import UserError

KL_FIELDS = ("kl", "log_ratio")


def _check_number(value: Any, field: str, where: str) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise UserError(f"{where}: field {field!r} must be a number, got {value!r}")
  if not math.isfinite(value):
    raise UserError(f"{where}: field {field!r} is not finite ({value})")
  return float(value)


def read_decode_file(path: str, *, require_kl: bool = True) -> list:
  """Reads and validates a decode JSONL file.

  Args:
    path: the file.
    require_kl: every row must hold `kl` and `log_ratio` (checked finite
      wherever present).

  Returns:
    The rows (dicts), each with `_line` (its 1-based line number) and `_key`
    ((prompt_index, sample) or the row's position within its lam group).
  """
  if not paths.isfile(path):
    raise UserError(f"decode file {path} not found")
  rows, seen = [], {}
  per_lam = {}
  with paths.open(path) as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path} row {line_no}"
      try:
        row = json.loads(line)
      except ValueError as e:
        raise UserError(f"{where}: not valid JSON ({e})") from e
      if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object")
      prompt = row.get("prompt")
      if not isinstance(prompt, str) or not prompt.strip():
        raise UserError(f"{where}: missing or empty 'prompt' field")
      if not isinstance(row.get("response"), str):
        raise UserError(f"{where}: missing 'response' field (a string)")
      for field in KL_FIELDS:
        if field in row:
          row[field] = _check_number(row[field], field, where)
        elif require_kl:
          raise UserError(f"{where}: missing field {field!r} (needed for the KL estimates; "
                          f"set require_kl=False for samplers that do not write it)")
      lam = row.get("lam")
      if isinstance(lam, list):  # multi-model DeRa: the weight vector (a hashable group key)
        lam = tuple(_check_number(x, "lam", where) for x in lam)
      elif lam is not None:
        lam = _check_number(lam, "lam", where)
      row["lam"] = lam
      if "prompt_index" in row or "sample" in row:
        key = (row.get("prompt_index"), row.get("sample", 0))
        if not all(isinstance(k, int) and not isinstance(k, bool) for k in key):
          raise UserError(f"{where}: 'prompt_index' and 'sample' must be integers")
      else:
        key = per_lam.get(lam, 0)
        per_lam[lam] = key + 1
      if (lam, key) in seen:
        raise UserError(f"{where}: duplicates row {seen[(lam, key)]} (same lam {lam} and "
                        f"prompt_index/sample {key})")
      seen[(lam, key)] = line_no
      row["_line"], row["_key"] = line_no, key
      rows.append(row)
  if not rows:
    raise UserError(f"decode file {path} holds no rows")
  return rows


def group_by_lam(rows: Sequence[dict]) -> dict:
  """{lam: rows} in order of first appearance; lam None for files without mixing."""
  groups = {}
  for r in rows:
    groups.setdefault(r["lam"], []).append(r)
  return groups


def select_groups(groups: dict, lambdas: Optional[Sequence[float]], path: str) -> dict:
  """Restricts groups to `lambdas` (all of which must be present), in that order."""
  if lambdas is None:
    return groups
  grid = LambdaGrid.of(lambdas, "evaluate.lambdas").list()
  missing = [lam for lam in grid if lam not in groups]
  if missing:
    have = [g for g in groups]
    raise UserError(f"decode file {path} has no rows at lam {missing} (it has {have})")
  return {lam: groups[lam] for lam in grid}


def pair_rows(rows_1: Sequence[dict], rows_2: Sequence[dict], path_1: str, path_2: str) -> list:
  """Matches rows of two groups by key; prompts must agree and no row may be left over."""
  by_key = {r["_key"]: r for r in rows_2}
  if len(rows_1) != len(rows_2):
    raise UserError(f"{path_1} and {path_2} hold different numbers of rows for the comparison "
                    f"({len(rows_1)} vs {len(rows_2)})")
  pairs = []
  for r in rows_1:
    other = by_key.get(r["_key"])
    if other is None:
      raise UserError(f"{path_1} row {r['_line']}: no row with prompt_index/sample {r['_key']} "
                      f"in {path_2}")
    if other["prompt"] != r["prompt"]:
      raise UserError(f"{path_1} row {r['_line']} and {path_2} row {other['_line']}: the prompts "
                      f"differ, so the responses cannot be compared")
    pairs.append((r, other))
  return pairs
