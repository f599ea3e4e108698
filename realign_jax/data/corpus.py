"""The built-in corpus: (docstring body, summary line) pairs in the package.

`builtin/corpus_{train,validation,test}.jsonl.gz` hold one {"id", "source",
"document", "summary"} object per line; `scripts/build_builtin_corpus.py`
writes them and `builtin/SOURCES.md` lists their sources and licences.
"""

from __future__ import annotations

import gzip
import json
import os
import pathlib
import zlib

from realign_jax.data.vocab import BUILTIN_DIR
from realign_jax.plumbing.errors import UserError

SPLITS = ("train", "validation", "test")


def corpus_file(split: str,
                corpus_dir: str | os.PathLike[str] | None = None
                ) -> pathlib.Path:
  """The file of one split; `corpus_dir` None means the shipped corpus."""
  if split not in SPLITS:
    raise UserError(f"unknown split {split!r}; known splits: "
                    f"{', '.join(SPLITS)}")
  return pathlib.Path(corpus_dir or BUILTIN_DIR) / f"corpus_{split}.jsonl.gz"


def check_corpus_dir(corpus_dir: str | os.PathLike[str]) -> pathlib.Path:
  """Checks that a directory holds the three corpus files."""
  path = pathlib.Path(corpus_dir)
  if not path.is_dir():
    raise UserError(f"corpus directory {path} does not exist or is not a "
                    "directory")
  missing = [corpus_file(s, path).name for s in SPLITS
             if not corpus_file(s, path).is_file()]
  if missing:
    raise UserError(f"corpus directory {path} lacks {', '.join(missing)}")
  return path


def read_corpus(split: str,
                corpus_dir: str | os.PathLike[str] | None = None
                ) -> list[dict[str, str]]:
  """Reads one split of the corpus.

  Args:
    split: "train", "validation" or "test".
    corpus_dir: a directory in the built-in format; None for the shipped one.

  Returns:
    {"id", "source", "document", "summary"} per example, in file order.
  """
  path = corpus_file(split, corpus_dir)
  rows = []
  try:
    with gzip.open(path, "rt", encoding="utf-8") as f:
      for number, line in enumerate(f, start=1):
        try:
          row = json.loads(line)
          rows.append({k: row[k] for k in ("id", "source", "document",
                                           "summary")})
        except (json.JSONDecodeError, KeyError, TypeError) as e:
          raise UserError(f"{path} row {number}: not a corpus row "
                          "({id, source, document, summary})") from e
  except OSError as e:
    raise UserError(f"cannot read corpus file {path}: "
                    f"{e.strerror or e}") from e
  except (EOFError, zlib.error, UnicodeDecodeError) as e:
    raise UserError(f"corpus file {path} is not gzip UTF-8 JSON lines") from e
  return rows
