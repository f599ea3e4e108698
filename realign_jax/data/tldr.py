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

Both also as the Hugging Face datasets publish them (parquet shards such as
`data/train-00000-of-00001.parquet`, or JSON-lines shards), read when the
directory has no file of the layouts above:

* SFT (e.g. the `summarize_from_feedback_tldr_3_filtered` datasets): splits
  train / validation / test, columns `id`, `subreddit`, `title`, `post`,
  `summary` (the same fields as the JSON lines above).
* Comparisons (`openai/summarize_from_feedback`, config `comparisons`, and
  its preprocessed copies): columns `info` (a struct of `id`, `post`,
  `title`, `subreddit`, `site`, `article`), `summaries` (a list of
  `{text, policy, note}`), `choice`, `worker`, `batch`, `split`, `extra`.
  Its train and validation shards are read together and the rows picked by
  their `split` column, as for the OpenAI files.

Bad files raise `UserError` naming the file and the 1-based line (a missing
column of a parquet shard: the file and the column).
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Iterator

from realign_jax.data import jsonl
from realign_jax.data.jsonl import iter_json_lines
from realign_jax.plumbing.errors import UserError

SPLITS = ("train", "validation", "test")
SFT_FILES = {"train": "train.jsonl", "validation": "valid.jsonl",
             "test": "test.jsonl"}
# Canonical split -> the `split` value of comparison rows.
COMPARISON_SPLITS = {"train": "train", "validation": "valid1",
                     "test": "valid2"}
COMPARISON_GLOB = "batch*.json"
SFT_FIELDS = ("id", "subreddit", "title", "post", "summary")
# Columns read from the Hugging Face shards (`id` is not needed).
HF_SFT_COLUMNS = SFT_FIELDS[1:]
HF_COMPARISON_COLUMNS = ("info", "summaries", "choice", "split")


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


def _is_openai_sft(path: pathlib.Path) -> bool:
  return any((path / f).is_file() for f in SFT_FILES.values())


def check_sft_dir(data_dir: str | os.PathLike[str]) -> pathlib.Path:
  """Checks that `data_dir` holds the three TL;DR SFT files or HF shards of all splits."""
  path = check_dir(data_dir, "TL;DR")
  if not _is_openai_sft(path):
    shards = jsonl.hf_shard_files(path)
    if shards:
      missing = [s for s in SPLITS if s not in shards]
      if missing:
        raise UserError(f"TL;DR data directory {path} has Hugging Face shards but none for "
                        f"the split(s) {', '.join(missing)} (files named e.g. "
                        f"{missing[0]}-00000-of-00001.parquet or {missing[0]}.jsonl)")
      return path
  missing = [f for f in SFT_FILES.values() if not (path / f).is_file()]
  if missing:
    raise UserError(f"TL;DR data directory {path} lacks {', '.join(missing)} "
                    "(expected train.jsonl, valid.jsonl, test.jsonl, or the Hugging Face "
                    "dataset's parquet/JSON-lines shards of train, validation and test)")
  return path


def _sft_example(where: str, row: Any) -> dict[str, str]:
  if not isinstance(row, dict):
    raise UserError(f"{where}: expected a JSON object")
  for field in SFT_FIELDS[1:]:
    if field not in row:
      raise UserError(f"{where}: missing field {field!r}")
    if not isinstance(row[field], str):
      raise UserError(f"{where}: field {field!r} is not a string")
  if not row["summary"].strip():
    raise UserError(f"{where}: field 'summary' is empty")
  return {"inputs": tldr_prompt(subreddit=row["subreddit"], title=row["title"],
                                post=row["post"]),
          "targets": row["summary"].strip()}


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
  root = check_sft_dir(data_dir)
  if not _is_openai_sft(root):
    return [_sft_example(where, row)
            for shard in jsonl.hf_shard_files(root)[split]
            for where, row in jsonl.iter_hf_rows(shard, HF_SFT_COLUMNS)]
  path = root / SFT_FILES[split]
  return [_sft_example(f"{path} row {number}", row)
          for number, row in iter_json_lines(path)]


def comparison_files(data_dir: str | os.PathLike[str]) -> list[pathlib.Path]:
  """The sorted `batch*.json` files of a comparisons directory, else its HF shards."""
  path = check_dir(data_dir, "TL;DR comparisons")
  files = sorted(p for p in path.glob(COMPARISON_GLOB) if p.is_file())
  if not files:
    files = [f for shards in jsonl.hf_shard_files(path).values() for f in shards]
  if not files:
    raise UserError(f"TL;DR comparisons data directory {path} has no "
                    f"{COMPARISON_GLOB} files and no Hugging Face parquet/JSON-lines "
                    "shards (e.g. data/train-00000-of-00001.parquet)")
  return sorted(files)


def _rows_of(path: pathlib.Path) -> Iterator[tuple[str, Any]]:
  """(where, row) of one comparisons file: OpenAI JSON lines or an HF shard."""
  if path.match(COMPARISON_GLOB) and path.suffix == ".json" and path.name.startswith("batch"):
    for number, row in iter_json_lines(path):
      yield f"{path} row {number}", row
    return
  for where, row in jsonl.iter_hf_rows(path, HF_COMPARISON_COLUMNS):
    info = row.get("info")
    if isinstance(info, dict):
      # NOTE: a parquet struct has every field; CNN/DM rows carry a null post.
      row = dict(row, info={k: v for k, v in info.items() if v is not None})
    yield where, row


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
    for where, row in _rows_of(path):
      if not isinstance(row, dict):
        yield where, row
        continue
      if row.get("split") != wanted:
        continue
      info = row.get("info")
      if isinstance(info, dict) and "post" not in info and "article" in info:
        continue  # CNN/DM, not TL;DR.
      yield where, row
