"""Builds the built-in (document, summary) corpus from installed docstrings.

The corpus pairs the body of a docstring (the document) with its summary line
(the summary). Docstrings are read with `ast` from the source files of the
Python standard library and of a fixed list of permissively licensed packages
installed in the environment; nothing is imported or executed. The output is
deterministic for a given set of installed files.

Writes, under `realign_jax/data/builtin/`:
  corpus_{train,validation,test}.jsonl.gz  one {"id", "source", "document",
                                           "summary"} object per line
  SOURCES.md                               sources, versions, licences, counts

Run from the repository root:

  python scripts/build_builtin_corpus.py
  python scripts/train_vocab.py   # the vocabulary depends on the train split
"""

from __future__ import annotations

import argparse
import ast
import collections
import gzip
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import re
import sys
import sysconfig
from typing import Iterator

# (import name, distribution name, SPDX licence). Distribution None = stdlib.
# Only permissive licences; packages under MPL/GPL (certifi, tqdm) are left out.
SOURCES: tuple[tuple[str, str | None, str], ...] = (
    ("stdlib", None, "PSF-2.0"),
    ("numpy", "numpy", "BSD-3-Clause"),
    ("scipy", "scipy", "BSD-3-Clause"),
    ("matplotlib", "matplotlib", "Matplotlib License (PSF-based)"),
    ("jax", "jax", "Apache-2.0"),
    ("flax", "flax", "Apache-2.0"),
    ("optax", "optax", "Apache-2.0"),
    ("orbax", "orbax-checkpoint", "Apache-2.0"),
    ("tensorflow", "tensorflow", "Apache-2.0"),
    ("keras", "keras", "Apache-2.0"),
    ("tensorflow_datasets", "tensorflow-datasets", "Apache-2.0"),
    ("seqio", "seqio", "Apache-2.0"),
    ("absl", "absl-py", "Apache-2.0"),
    ("gin", "gin-config", "Apache-2.0"),
    ("etils", "etils", "Apache-2.0"),
    ("requests", "requests", "Apache-2.0"),
    ("attr", "attrs", "MIT"),
    ("rich", "rich", "MIT"),
    ("pygments", "Pygments", "BSD-2-Clause"),
    ("pyparsing", "pyparsing", "MIT"),
    ("h5py", "h5py", "BSD-3-Clause"),
    ("PIL", "pillow", "MIT-CMU"),
    ("fontTools", "fonttools", "MIT"),
    ("dateutil", "python-dateutil", "BSD-3-Clause"),
    ("pyarrow", "pyarrow", "Apache-2.0"),
    ("einops", "einops", "MIT"),
    ("optree", "optree", "Apache-2.0"),
    ("urllib3", "urllib3", "MIT"),
    ("packaging", "packaging", "Apache-2.0 OR BSD-2-Clause"),
)

OUT_DIR = pathlib.Path(__file__).resolve().parent.parent / (
    "realign_jax/data/builtin")
SPLITS = ("train", "validation", "test")

MIN_BODY_WORDS = 15
MAX_BODY_WORDS = 200
MIN_SUMMARY_WORDS = 3
MAX_SUMMARY_WORDS = 40
# At most this many pairs per source, so that no single package dominates.
MAX_PER_SOURCE = 2000

_SKIP_DIRS = frozenset({
    "test", "tests", "testing", "idle_test", "_vendor", "vendored",
    "site-packages", "turtledemo", "__pycache__", "ensurepip", "lib2to3",
    "pydoc_data", "benchmarks", "_build_utils",
})
# Section headings after which a docstring holds examples or references.
_CUT_HEADING = re.compile(
    r"^\s*(\.\. rubric::\s*)?(examples?|example usage|usage|references?|"
    r"see also|doctest|sample usage)\s*:?\s*$", re.IGNORECASE)
_UNDERLINE = re.compile(r"^\s*([-=~^*+#\"'`])\1{2,}\s*$")
_ROLE = re.compile(r":[\w:+.-]+:`~?\.?([^`<]*?)(\s*<[^>]*>)?`")
_LINK = re.compile(r"`([^`<]+?)\s*<[^>]+>`_+")
_BACKTICKS = re.compile(r"`{1,2}([^`]+)`{1,2}_?")
_SIGNATURE = re.compile(r"^[\w.]+\(.*\)(\s*->.*)?$")
_WORD = re.compile(r"^[A-Za-z][A-Za-z'-]*[.,;:)]?$")


def source_root(name: str) -> pathlib.Path:
  """Returns the directory holding the sources of `name`."""
  if name == "stdlib":
    return pathlib.Path(sysconfig.get_paths()["stdlib"])
  spec = importlib.util.find_spec(name)
  if spec is None or not spec.submodule_search_locations:
    raise SystemExit(f"error: package {name} is not installed")
  return pathlib.Path(list(spec.submodule_search_locations)[0])


def iter_python_files(root: pathlib.Path) -> Iterator[pathlib.Path]:
  """Yields the non-test `.py` files under `root`, in sorted order."""
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS
                         and not d.startswith("."))
    for filename in sorted(filenames):
      if (not filename.endswith(".py") or filename.startswith("test_")
          or filename.endswith("_test.py") or filename == "conftest.py"):
        continue
      yield pathlib.Path(dirpath) / filename


def iter_docstrings(path: pathlib.Path) -> Iterator[tuple[str, str]]:
  """Yields (qualified name, cleaned docstring) for each docstring in a file."""
  try:
    tree = ast.parse(path.read_bytes(), filename=str(path))
  except (SyntaxError, ValueError, UnicodeDecodeError):
    return

  def visit(node: ast.AST, prefix: str) -> Iterator[tuple[str, str]]:
    for child in ast.iter_child_nodes(node):
      if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                            ast.ClassDef)):
        name = f"{prefix}.{child.name}" if prefix else child.name
        doc = ast.get_docstring(child, clean=True)
        if doc:
          yield name, doc
        yield from visit(child, name)

  doc = ast.get_docstring(tree, clean=True)
  if doc:
    yield "<module>", doc
  yield from visit(tree, "")


def _strip_markup(text: str) -> str:
  text = _ROLE.sub(r"\1", text)
  text = _LINK.sub(r"\1", text)
  text = _BACKTICKS.sub(r"\1", text)
  return " ".join(text.split())


def _drop_code(lines: list[str]) -> list[str]:
  """Drops doctest blocks, literal blocks, directives and underlines."""
  out = []
  i = 0
  while i < len(lines):
    line = lines[i]
    stripped = line.strip()
    indent = len(line) - len(line.lstrip())
    if stripped.startswith((">>>", "...")):
      # A doctest: the prompt lines and their output, up to a blank line.
      while i < len(lines) and lines[i].strip():
        i += 1
      continue
    if stripped.startswith(".. ") or stripped.endswith("::"):
      # A directive or a literal block: drop its indented content, keeping the
      # text of admonitions such as `.. note::`.
      keep = re.match(r"\.\.\s+(note|warning|versionadded|versionchanged|"
                      r"deprecated|important|tip|caution)::", stripped)
      if stripped.endswith("::") and not stripped.startswith(".."):
        out.append(line.rstrip(":") + ":")
      elif keep and keep.group(1) in ("note", "warning", "important", "tip",
                                      "caution"):
        out.append(" " * indent + stripped.split("::", 1)[1])
        i += 1
        continue
      i += 1
      while i < len(lines) and (not lines[i].strip() or
                                len(lines[i]) - len(lines[i].lstrip()) >
                                indent):
        i += 1
      continue
    if _UNDERLINE.match(line):
      i += 1
      continue
    out.append(line)
    i += 1
  return out


def make_pair(doc: str) -> tuple[str, str] | None:
  """Splits a docstring into (document, summary), or None if it is unusable."""
  lines = doc.splitlines()
  # The summary is the first paragraph.
  end = 0
  while end < len(lines) and lines[end].strip():
    end += 1
  summary = _strip_markup(" ".join(lines[:end]))
  rest = lines[end:]
  for j, line in enumerate(rest):
    nxt = rest[j + 1] if j + 1 < len(rest) else ""
    if _CUT_HEADING.match(line) and (not nxt.strip() or _UNDERLINE.match(nxt)
                                     or line.rstrip().endswith(":")):
      rest = rest[:j]
      break
  document = _strip_markup(" ".join(_drop_code(rest)))

  summary_words = summary.split()
  if not MIN_SUMMARY_WORDS <= len(summary_words) <= MAX_SUMMARY_WORDS:
    return None
  if (summary.endswith((":", ",")) or _SIGNATURE.match(summary)
      or summary.startswith((">>>", "..", "#", "-", "*"))
      or not summary[0].isalpha()):
    return None
  if sum(bool(_WORD.match(w)) for w in summary_words) < 0.7 * len(
      summary_words):
    return None

  words = document.split()
  if len(words) < MIN_BODY_WORDS:
    return None
  # Code-heavy bodies read badly as documents.
  if sum(bool(_WORD.match(w)) for w in words) < 0.6 * len(words):
    return None
  if len(words) > MAX_BODY_WORDS:
    words = words[:MAX_BODY_WORDS]
  return " ".join(words), summary


def _key(text: str) -> str:
  return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def split_of(example_id: str) -> str:
  """A fixed ~90/5/5 split by a hash of the stable example id."""
  bucket = int(hashlib.sha256(example_id.encode()).hexdigest()[:8], 16) % 100
  return "train" if bucket < 90 else "validation" if bucket < 95 else "test"


def source_version(name: str, dist: str | None) -> str:
  if dist is None:
    return f"Python {sys.version.split()[0]}"
  return importlib.metadata.version(dist)


def declared_licence(dist: str | None) -> str:
  """The licence a distribution declares in its metadata, in short."""
  if dist is None:
    return "PSF-2.0"
  meta = importlib.metadata.metadata(dist)
  if meta.get("License-Expression"):
    return meta["License-Expression"]
  text = " ".join((meta.get("License") or "").split())
  if text and len(text) <= 40:
    return text
  for classifier in meta.get_all("Classifier") or []:
    if classifier.startswith("License ::"):
      return classifier.split("::")[-1].strip()
  return text[:40] or "unknown"


def build() -> tuple[dict[str, list[dict[str, str]]], list[dict[str, str]]]:
  """Collects the corpus; returns (examples per split, per-source records)."""
  seen_summaries: set[str] = set()
  seen_documents: set[str] = set()
  splits: dict[str, list[dict[str, str]]] = {s: [] for s in SPLITS}
  records = []
  for name, dist, licence in SOURCES:
    root = source_root(name)
    candidates = []
    for path in iter_python_files(root):
      module = path.relative_to(root).with_suffix("").as_posix()
      for qualname, doc in iter_docstrings(path):
        pair = make_pair(doc)
        if pair is None:
          continue
        document, summary = pair
        skey, dkey = _key(summary), _key(document)
        if skey in seen_summaries or dkey in seen_documents:
          continue
        seen_summaries.add(skey)
        seen_documents.add(dkey)
        candidates.append({"id": f"{name}:{module}:{qualname}",
                           "source": name, "document": document,
                           "summary": summary})
    # NOTE: a hash order (not file order) picks the capped subset, so that it
    # spreads over the whole package.
    candidates.sort(key=lambda e: hashlib.sha256(e["id"].encode()).digest())
    kept = sorted(candidates[:MAX_PER_SOURCE], key=lambda e: e["id"])
    counts = collections.Counter()
    for example in kept:
      split = split_of(example["id"])
      splits[split].append(example)
      counts[split] += 1
    records.append({"source": name, "distribution": dist or "CPython stdlib",
                    "version": source_version(name, dist), "licence": licence,
                    "declared": declared_licence(dist),
                    "found": len(candidates), **counts})
    print(f"{name:22s} {len(candidates):6d} found, {len(kept):6d} kept",
          file=sys.stderr)
  return splits, records


def write_jsonl_gz(path: pathlib.Path, rows: list[dict[str, str]]) -> None:
  """Writes gzip JSON lines byte-for-byte deterministically (mtime 0)."""
  tmp = path.with_suffix(path.suffix + ".tmp")
  with open(tmp, "wb") as raw:
    with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0,
                       compresslevel=9) as f:
      for row in rows:
        f.write((json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
                .encode("utf-8"))
  os.replace(tmp, path)


def write_sources(path: pathlib.Path, splits, records) -> None:
  """Writes SOURCES.md."""
  total = {s: len(splits[s]) for s in SPLITS}
  lines = [
      "# Built-in corpus: sources",
      "",
      "Generated by `scripts/build_builtin_corpus.py`; do not edit by hand.",
      "",
      "Each example pairs the body of a docstring (`document`, cleaned: "
      "doctests, literal blocks, example/reference sections and markup "
      f"removed, whitespace collapsed, cut to {MAX_BODY_WORDS} words) with "
      "its summary line (`summary`). Docstrings are read with `ast` from the "
      "installed source files listed below (tests and vendored code "
      "excluded). Kept: bodies of at least "
      f"{MIN_BODY_WORDS} words, summaries of {MIN_SUMMARY_WORDS} to "
      f"{MAX_SUMMARY_WORDS} words; duplicates by summary and by body dropped; "
      f"at most {MAX_PER_SOURCE} examples per source (chosen by a hash of "
      "the id). Split: sha256 of the id `source:module:qualname`, "
      "buckets 0-89 train, 90-94 validation, 95-99 test.",
      "",
      "`vocab.model` is trained on the train split (documents and "
      "summaries) by `scripts/train_vocab.py`: sentencepiece unigram, 2048 "
      "pieces, byte fallback, pad 0, eos 1, unk 2, no bos.",
      "",
      "The text is the copyrighted documentation of these projects, "
      "redistributed under their licences (all permissive); each licence's "
      "notice applies to the examples whose `source` names that project.",
      "",
      "`licence` is the licence of the project's Python sources; `declared` "
      "is what the installed distribution's metadata says (for numpy it "
      "also covers bundled C code).",
      "",
      "| source | distribution | version | licence | declared | train "
      "| validation | test |",
      "|---|---|---|---|---|---:|---:|---:|",
  ]
  for r in records:
    lines.append(
        f"| {r['source']} | {r['distribution']} | {r['version']} | "
        f"{r['licence']} | {r['declared']} | {r.get('train', 0)} | "
        f"{r.get('validation', 0)} | "
        f"{r.get('test', 0)} |")
  lines.append(f"| **total** | | | | | {total['train']} | "
               f"{total['validation']} | {total['test']} |")
  lines.append("")
  path.write_text("\n".join(lines))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out_dir", default=str(OUT_DIR))
  args = parser.parse_args()
  out_dir = pathlib.Path(args.out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  splits, records = build()
  for split in SPLITS:
    write_jsonl_gz(out_dir / f"corpus_{split}.jsonl.gz", splits[split])
  write_sources(out_dir / "SOURCES.md", splits, records)
  print({s: len(v) for s, v in splits.items()}, file=sys.stderr)


if __name__ == "__main__":
  main()
