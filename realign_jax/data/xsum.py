"""XSum through the TFDS `xsum` builder (version 1.1.0), offline.

The XSum data directory is either

* a TFDS data directory where `xsum/1.1.0` is already prepared, or
* the builder's manual directory, as its instructions ask:
  `xsum-extracts-from-downloads.tar.gz` (the folder
  `xsum-extracts-from-downloads/` of `{bbcid}.data` files that the XSum
  download scripts write) and `XSum-TRAINING-DEV-TEST-SPLIT-90-5-5.json` (the
  split file `{"train": [ids], "validation": [...], "test": [...]}` from the
  XSum repository). The builder would download the split file; TFDS takes it
  from the manual directory instead when it is there, after checking its
  registered checksum. The prepared dataset is written to `<dir>/tfds`, or
* the Hugging Face dataset `EdinburghNLP/xsum` as downloaded: parquet shards
  (`data/train-00000-of-00001.parquet`, ...) or JSON-lines shards of the
  splits train, validation and test, with the columns `document`, `summary`
  and `id`. Read directly with pyarrow, nothing prepared.
"""

from __future__ import annotations

import importlib
import importlib.resources
import importlib.util
import os
import pathlib
import sys

from realign_jax.data import jsonl
from realign_jax.plumbing import startup
from realign_jax.plumbing.errors import UserError

TFDS_NAME = "xsum:1.1.0"
TARBALL = "xsum-extracts-from-downloads.tar.gz"
SPLIT_FILE = "XSum-TRAINING-DEV-TEST-SPLIT-90-5-5.json"
SPLITS = ("train", "validation", "test")
HF_COLUMNS = ("document", "summary")  # the published dataset also has "id"


def provide_importlib_resources() -> None:
  """Lets TFDS find `importlib_resources` when the backport is not installed.

  NOTE: TFDS 4.9.10 needs `importlib_resources.abc.Traversable` to locate a
  builder's checksums file, but the backport is not among our pinned
  dependencies; the standard library module has the same API on Python 3.11.
  """
  if importlib.util.find_spec("importlib_resources") is None:
    importlib.import_module("importlib.resources.abc")
    sys.modules.setdefault("importlib_resources", importlib.resources)


def _is_prepared(tfds_dir: pathlib.Path) -> bool:
  return (tfds_dir / "xsum" / "1.1.0" / "dataset_info.json").is_file()


def prepare_xsum(data_dir: str | os.PathLike[str]) -> str:
  """Prepares XSum if needed; returns the TFDS data dir that holds it.

  Args:
    data_dir: a TFDS data dir with xsum/1.1.0 prepared, or the manual dir.

  Returns:
    The TFDS data directory to read `xsum:1.1.0` from.

  Raises:
    UserError: the directory is missing, lacks the manual files, or the
      files are not what the builder expects.
  """
  path = pathlib.Path(data_dir)
  if not path.is_dir():
    raise UserError(f"XSum data directory {path} does not exist or is not a "
                    "directory")
  if _is_prepared(path):
    return str(path)
  tfds_dir = path / "tfds"
  if _is_prepared(tfds_dir):
    return str(tfds_dir)
  missing = [f for f in (TARBALL, SPLIT_FILE) if not (path / f).is_file()]
  if missing:
    raise UserError(
        f"XSum data directory {path} lacks {', '.join(missing)} (expected "
        f"{TARBALL} and {SPLIT_FILE}, a TFDS data dir with xsum/1.1.0, or the "
        "Hugging Face dataset's parquet/JSON-lines shards)")

  provide_importlib_resources()
  # NOTE: imported here, since TFDS is slow to import and most runs never
  # prepare XSum.
  startup.import_tensorflow()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=g-import-not-at-top
  from tensorflow_datasets.core.download import download_manager

  builder = tfds.builder(TFDS_NAME, data_dir=str(tfds_dir))
  config = tfds.download.DownloadConfig(
      manual_dir=str(path),
      try_download_gcs=False,
      download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS,
  )
  try:
    builder.download_and_prepare(
        download_dir=str(tfds_dir / "downloads"), download_config=config)
  except download_manager.NonMatchingChecksumError as e:
    raise UserError(
        f"{path / SPLIT_FILE} is not the official XSum split file (its "
        "checksum differs from the one TFDS registers)") from e
  except (IndexError, KeyError, ValueError) as e:
    # NOTE: the builder indexes `text.split("[XSUM]")` and the split dict;
    # a malformed `.data` file or split file ends up here.
    raise UserError(f"XSum files in {path} are malformed: {e!r}") from e
  return str(tfds_dir)


def is_hf_layout(data_dir: str | os.PathLike[str]) -> bool:
  """Whether `data_dir` is the HF dataset's shards (not a TFDS or manual directory)."""
  path = pathlib.Path(data_dir)
  if not path.is_dir() or _is_prepared(path) or _is_prepared(path / "tfds"):
    return False
  if any((path / f).is_file() for f in (TARBALL, SPLIT_FILE)):
    return False
  return bool(jsonl.hf_shard_files(path))


def check_hf_dir(data_dir: str | os.PathLike[str]) -> None:
  """Every split has at least one shard."""
  shards = jsonl.hf_shard_files(data_dir)
  missing = [s for s in SPLITS if s not in shards]
  if missing:
    raise UserError(f"XSum data directory {data_dir} has Hugging Face shards but none for the "
                    f"split(s) {', '.join(missing)} (files named e.g. "
                    f"{missing[0]}-00000-of-00001.parquet or {missing[0]}.jsonl)")


def read_hf(data_dir: str | os.PathLike[str], split: str) -> list[dict[str, str]]:
  """{"document", "summary"} rows of one split of the HF shards, in file order."""
  if split not in SPLITS:
    raise UserError(f"unknown split {split!r}; known splits: {', '.join(SPLITS)}")
  check_hf_dir(data_dir)
  out = []
  for shard in jsonl.hf_shard_files(data_dir)[split]:
    for where, row in jsonl.iter_hf_rows(shard, HF_COLUMNS):
      for column in HF_COLUMNS:
        if not isinstance(row[column], str):
          raise UserError(f"{where}: column {column!r} is not a string")
      out.append({"document": row["document"], "summary": row["summary"]})
  return out
