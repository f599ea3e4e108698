"""Readers for OpenAI's summarize-from-feedback TL;DR releases.

Two upstream layouts, read as they are published:

* SFT (`tldr_3_filtered`): a directory with `train.jsonl`, `valid.jsonl` and
  `test.jsonl`; each line is `{"id", "subreddit", "title", "post",
  "summary"}`.
* Comparisons: a directory of `batch*.json` files in JSON-lines form; each
  line is `{"info": {"id", "post", "title", "subreddit", ...}, "summaries":
  [{"text", "policy", "note"}, {...}], "choice": 0 or 1, "split": "train" |
  "valid1" | "valid2", "worker", "batch", ...}`. Rows about CNN/DM articles
  (`info` has an `article` and no `post`) are not TL;DR and are left out.

Bad files raise `UserError` naming the file and the 1-based line.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Iterator

from realign_jax.data.jsonl import iter_json_lines
from realign_jax.errors import UserError

SPLITS = ("train", "validation", "test")
SFT_FILES = {"train": "train.jsonl", "validation": "valid.jsonl",
             "test": "test.jsonl"}
# Canonical split -> the `split` value of comparison rows.
COMPARISON_SPLITS = {"train": "train", "validation": "valid1",
                     "test": "valid2"}
COMPARISON_GLOB = "batch*.json"
SFT_FIELDS = ("id", "subreddit", "title", "post", "summary")


def tldr_prompt(*, subreddit: str, title: str, post: str) -> str:
  """The TL;DR prompt of the summarize-from-feedback paper."""
  return (f"SUBREDDIT: r/{subreddit.strip()}\nTITLE: {title.strip()}\n"
          f"POST: {post.strip()}\nTL;DR:")


def check_dir(data_dir: str | os.PathLike[str], what: str) -> pathlib.Path:
  """Returns `data_dir` as a path, or raises UserError if it is not a dir."""
  path = pathlib.Path(data_dir)
  if not path.is_dir():
    raise UserError(f"{what} data directory {path} does not exist or is not "
                    "a directory")
  return path


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise UserError(f"unknown split {split!r}; known splits: "
                    f"{', '.join(SPLITS)}")


def check_sft_dir(data_dir: str | os.PathLike[str]) -> pathlib.Path:
  """Checks that `data_dir` holds the three TL;DR SFT files."""
  path = check_dir(data_dir, "TL;DR")
  missing = [f for f in SFT_FILES.values() if not (path / f).is_file()]
  if missing:
    raise UserError(f"TL;DR data directory {path} lacks {', '.join(missing)} "
                    "(expected train.jsonl, valid.jsonl, test.jsonl)")
  return path


def read_sft(data_dir: str | os.PathLike[str],
             split: str) -> list[dict[str, str]]:
  """Reads one split of the TL;DR SFT release.

  Args:
    data_dir: directory with train.jsonl, valid.jsonl and test.jsonl.
    split: "train", "validation" or "test".

  Returns:
    {"inputs": prompt, "targets": summary} per row, in file order.
  """
  _check_split(split)
  path = check_sft_dir(data_dir) / SFT_FILES[split]
  out = []
  for number, row in iter_json_lines(path):
    where = f"{path} row {number}"
    if not isinstance(row, dict):
      raise UserError(f"{where}: expected a JSON object")
    for field in SFT_FIELDS[1:]:
      if field not in row:
        raise UserError(f"{where}: missing field {field!r}")
      if not isinstance(row[field], str):
        raise UserError(f"{where}: field {field!r} is not a string")
    if not row["summary"].strip():
      raise UserError(f"{where}: field 'summary' is empty")
    out.append({"inputs": tldr_prompt(subreddit=row["subreddit"],
                                      title=row["title"], post=row["post"]),
                "targets": row["summary"].strip()})
  return out


def comparison_files(data_dir: str | os.PathLike[str]) -> list[pathlib.Path]:
  """The sorted `batch*.json` files of a comparisons directory."""
  path = check_dir(data_dir, "TL;DR comparisons")
  files = sorted(p for p in path.glob(COMPARISON_GLOB) if p.is_file())
  if not files:
    raise UserError(f"TL;DR comparisons data directory {path} has no "
                    f"{COMPARISON_GLOB} files")
  return files


def iter_comparison_rows(
    data_dir: str | os.PathLike[str], split: str,
) -> Iterator[tuple[str, dict[str, Any]]]:
  """Yields (where, row) for the TL;DR comparison rows of one split.

  `where` is "FILE row N" for error messages. Rows of other splits and rows
  about CNN/DM articles are passed over; rows that are not JSON objects are
  yielded as they are, for the caller to reject.

  Args:
    data_dir: directory of `batch*.json` JSON-lines files.
    split: "train", "validation" (valid1) or "test" (valid2).
  """
  _check_split(split)
  wanted = COMPARISON_SPLITS[split]
  for path in comparison_files(data_dir):
    for number, row in iter_json_lines(path):
      where = f"{path} row {number}"
      if not isinstance(row, dict):
        yield where, row
        continue
      if row.get("split") != wanted:
        continue
      info = row.get("info")
      if isinstance(info, dict) and "post" not in info and "article" in info:
        continue  # CNN/DM, not TL;DR.
      yield where, row
