"""JSON lines files: one object per non-blank line, errors naming file and row."""

from __future__ import annotations

import json
import os
from typing import Any, Iterator

from realign_jax.errors import UserError


def iter_json_lines(path: str | os.PathLike[str]) -> Iterator[tuple[int, Any]]:
  """Yields (1-based line number, parsed JSON) of the non-blank lines."""
  try:
    f = open(path, encoding="utf-8")
  except OSError as e:
    raise UserError(f"cannot read {path}: {e.strerror}") from e
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
