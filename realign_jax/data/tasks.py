"""seqio tasks: the built-in corpus, XSum and the TL;DR releases.

| task              | features                 | data directory (env var)     |
|-------------------|--------------------------|------------------------------|
| builtin_summarize | inputs, targets          | shipped (optional)           |
| xsum              | inputs, targets          | REALIGN_XSUM_DIR             |
| tldr_sft          | inputs, targets          | REALIGN_TLDR_DIR             |
| tldr_comparisons  | prompt, chosen, rejected | REALIGN_TLDR_COMPARISONS_DIR |
| preferences       | prompt, chosen, rejected | REALIGN_PREFERENCES_DIR      |

Every task has the splits train, validation and test. `preferences` reads
`{train,validation,test}.jsonl` in the schema of `preferences.py`. xsum,
tldr_sft and tldr_comparisons also read the Hugging Face datasets' parquet or
JSON-lines shards from their directory (see xsum.py and tldr.py).

`get_task` registers a task on first use and returns it; a task read from a
non-default directory or with a non-default vocabulary is registered under
`NAME_<hash>`, so several can coexist. Registration is idempotent.

Each task's preprocessors are: text-level steps (e.g. rekey), then
`seqio.preprocessors.tokenize`, the cache placeholder and
`append_eos_after_trim`; `text_dataset` runs the text-level steps only.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import pathlib
from typing import Callable, Sequence

from absl import logging
import numpy as np

from realign_jax.plumbing import startup

tf = startup.import_tensorflow()
import seqio  # noqa: E402  (after TensorFlow's quiet import)

from realign_jax.data import corpus
from realign_jax.data import preferences
from realign_jax.data import tldr
from realign_jax.data import vocab as vocab_lib
from realign_jax.data import xsum
from realign_jax.plumbing.errors import UserError

SPLITS = ("train", "validation", "test")
SUMMARY_FEATURES = ("inputs", "targets")
PREFERENCE_FEATURES = ("prompt", "chosen", "rejected")


@dataclasses.dataclass(frozen=True)
class _Spec:
  """How to build one task.

  Attributes:
    features: the text features of its examples.
    env_var: environment variable with the default data directory.
    needs_dir: whether a data directory is required.
    make_source: data dir -> seqio data source (checks the dir first).
    text_preprocessors: preprocessors that run before tokenization.
  """
  features: tuple[str, ...]
  env_var: str | None
  needs_dir: bool
  make_source: Callable[[str | None], seqio.DataSourceInterface]
  text_preprocessors: tuple[Callable[..., tf.data.Dataset], ...] = ()


def _text_dataset_from_rows(rows: Sequence[dict[str, str]],
                            features: Sequence[str]) -> tf.data.Dataset:
  """A dataset of string features from Python rows (kept in order)."""
  columns = {}
  for name in features:
    values = np.array([row[name] for row in rows], dtype=object)
    columns[name] = tf.constant(values if len(rows) else [], dtype=tf.string)
  return tf.data.Dataset.from_tensor_slices(columns)


def _function_source(
    read: Callable[[str], list[dict[str, str]]],
    features: Sequence[str]) -> seqio.FunctionDataSource:
  """A source that reads a split eagerly in Python (so UserErrors surface)."""

  def dataset_fn(split: str, shuffle_files: bool,
                 seed: int | None = None) -> tf.data.Dataset:
    del shuffle_files, seed  # One in-memory "file"; order is the file order.
    return _text_dataset_from_rows(read(split), features)

  return seqio.FunctionDataSource(dataset_fn, splits=SPLITS)


def _builtin_source(data_dir: str | None) -> seqio.DataSourceInterface:
  if data_dir is not None:
    corpus.check_corpus_dir(data_dir)

  def read(split: str) -> list[dict[str, str]]:
    return [{"inputs": r["document"], "targets": r["summary"]}
            for r in corpus.read_corpus(split, data_dir)]

  return _function_source(read, SUMMARY_FEATURES)


def _xsum_source(data_dir: str | None) -> seqio.DataSourceInterface:
  if xsum.is_hf_layout(data_dir):
    # NOTE: document/summary, as the TFDS source gives them (the rekey follows).
    xsum.check_hf_dir(data_dir)
    return _function_source(functools.partial(xsum.read_hf, data_dir),
                            xsum.HF_COLUMNS)
  tfds_dir = xsum.prepare_xsum(data_dir)
  return seqio.TfdsDataSource(xsum.TFDS_NAME, tfds_data_dir=tfds_dir,
                              splits=SPLITS, read_only=True)


def _tldr_sft_source(data_dir: str | None) -> seqio.DataSourceInterface:
  tldr.check_sft_dir(data_dir)
  return _function_source(functools.partial(tldr.read_sft, data_dir),
                          SUMMARY_FEATURES)


def _tldr_comparisons_source(
    data_dir: str | None) -> seqio.DataSourceInterface:
  tldr.comparison_files(data_dir)

  def read(split: str) -> list[dict[str, str]]:
    # NOTE: the upstream release has a few unusable rows (e.g. identical
    # summaries); they are skipped with a warning, not fatal.
    rows, _ = preferences.load_tldr_comparisons(data_dir, split,
                                                skip_invalid=True)
    return rows

  return _function_source(read, PREFERENCE_FEATURES)


def _preferences_source(data_dir: str | None) -> seqio.DataSourceInterface:
  path = tldr.check_dir(data_dir, "preference")
  missing = [f"{s}.jsonl" for s in SPLITS
             if not (path / f"{s}.jsonl").is_file()]
  if missing:
    raise UserError(f"preference data directory {path} lacks "
                    f"{', '.join(missing)}")

  def read(split: str) -> list[dict[str, str]]:
    rows, _ = preferences.load_preference_jsonl(path / f"{split}.jsonl")
    return rows

  return _function_source(read, PREFERENCE_FEATURES)


_SPECS: dict[str, _Spec] = {
    "builtin_summarize": _Spec(SUMMARY_FEATURES, None, False, _builtin_source),
    "xsum": _Spec(
        SUMMARY_FEATURES, "REALIGN_XSUM_DIR", True, _xsum_source,
        (functools.partial(seqio.preprocessors.rekey,
                           key_map={"inputs": "document",
                                    "targets": "summary"}),)),
    "tldr_sft": _Spec(SUMMARY_FEATURES, "REALIGN_TLDR_DIR", True,
                      _tldr_sft_source),
    "tldr_comparisons": _Spec(PREFERENCE_FEATURES,
                              "REALIGN_TLDR_COMPARISONS_DIR", True,
                              _tldr_comparisons_source),
    "preferences": _Spec(PREFERENCE_FEATURES, "REALIGN_PREFERENCES_DIR", True,
                         _preferences_source),
}
TASK_NAMES = tuple(_SPECS)


def task_features(name: str) -> tuple[str, ...]:
  """The text features of a task, e.g. ("inputs", "targets")."""
  return _spec(name).features


def _spec(name: str) -> _Spec:
  if name not in _SPECS:
    raise UserError(f"unknown task {name!r}; known tasks: "
                    f"{', '.join(TASK_NAMES)}")
  return _SPECS[name]


def resolve_data_dir(name: str, data_dir: str | os.PathLike[str] | None
                     ) -> str | None:
  """The absolute data directory of a task (argument, else env var)."""
  spec = _spec(name)
  if data_dir is None and spec.env_var:
    data_dir = os.environ.get(spec.env_var) or None
  if data_dir is None:
    if spec.needs_dir:
      raise UserError(f"task {name} needs a data directory: pass data_dir or "
                      f"set {spec.env_var}")
    return None
  return str(pathlib.Path(data_dir).expanduser().absolute())


def registered_name(name: str, data_dir: str | None,
                    vocab_path: str | None) -> str:
  """The seqio name of a task for one (data dir, vocabulary)."""
  if data_dir is None and vocab_path is None:
    return name
  key = f"{data_dir or ''}\n{vocab_path or ''}"
  return f"{name}_{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def get_task(name: str, *, data_dir: str | os.PathLike[str] | None = None,
             vocab_path: str | os.PathLike[str] | None = None) -> seqio.Task:
  """Registers (once) and returns a task.

  Args:
    name: one of TASK_NAMES.
    data_dir: the task's data directory; None to use its environment
      variable (see the module docstring). For builtin_summarize, a directory
      in the corpus format, None for the shipped corpus.
    vocab_path: a sentencepiece model; None for the built-in vocabulary.

  Returns:
    The registered seqio task.

  Raises:
    UserError: unknown task, missing or malformed data directory, or bad
      vocabulary.
  """
  spec = _spec(name)
  resolved_dir = resolve_data_dir(name, data_dir)
  resolved_vocab = (None if vocab_path is None
                    else vocab_lib.resolve_vocab_path(vocab_path))
  if resolved_vocab == vocab_lib.BUILTIN_VOCAB_PATH:
    resolved_vocab = None
  task_name = registered_name(name, resolved_dir, resolved_vocab)
  if task_name in seqio.TaskRegistry.names():
    return seqio.TaskRegistry.get(task_name)

  vocab = vocab_lib.load_vocabulary(resolved_vocab)
  source = spec.make_source(resolved_dir)
  output_features = {f: seqio.Feature(vocab, add_eos=True, dtype=tf.int32)
                     for f in spec.features}
  logging.info("registering seqio task %s (%s, data %s)", task_name, name,
               resolved_dir or "built-in")
  return seqio.TaskRegistry.add(
      task_name,
      source=source,
      output_features=output_features,
      preprocessors=[
          *spec.text_preprocessors,
          seqio.preprocessors.tokenize,
          seqio.CacheDatasetPlaceholder(),
          seqio.preprocessors.append_eos_after_trim,
      ],
      metric_fns=[],
  )


def register_tasks() -> list[str]:
  """Registers builtin_summarize and each task whose env var is set.

  Returns:
    The registered seqio task names.
  """
  names = [get_task("builtin_summarize").name]
  for name, spec in _SPECS.items():
    if spec.env_var and os.environ.get(spec.env_var):
      names.append(get_task(name).name)
  return names


def text_dataset(task: seqio.Task, split: str) -> tf.data.Dataset:
  """The task's text examples of a split, in a fixed order, untokenized.

  Args:
    task: a task from `get_task`.
    split: "train", "validation" or "test".

  Returns:
    A dataset of string features (e.g. inputs/targets).
  """
  if split not in SPLITS:
    raise UserError(f"unknown split {split!r} for task {task.name}; known "
                    f"splits: {', '.join(SPLITS)}")
  ds = task.source.get_dataset(split=split, shuffle=False)
  for preprocessor in task.preprocessors:
    if preprocessor is seqio.preprocessors.tokenize:
      break
    ds = preprocessor(ds)
  return ds
