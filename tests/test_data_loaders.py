"""Tests of the real-data loaders on small files in the upstream formats."""

import io
import json
import re
import tarfile

import numpy as np
import pytest

from realign_jax.data import pipeline
from realign_jax.data import preferences
from realign_jax.data import tasks
from realign_jax.data import xsum
from realign_jax.plumbing.errors import UserError

# ---------------------------------------------------------------- XSum ----

XSUM_IDS = {"train": ["36221701", "36221702", "36221703"],
            "validation": ["36221704"], "test": ["36221705", "36221706"]}


def _xsum_data_file(bbcid: str) -> str:
  """A `.data` file as written by the XSum extraction scripts."""
  return (
      "[XSUM]URL[XSUM]\n"
      f"http://www.bbc.co.uk/news/uk-{bbcid}\n\n"
      "[XSUM]INTRODUCTION[XSUM]\n"
      f"A council has approved plans for a new bridge, number {bbcid}.\n\n"
      "[XSUM]RESTBODY[XSUM]\n"
      f"The bridge {bbcid} will cross the river near the town centre.\n"
      "Share this with\n"
      "Email\n"
      "Councillors voted seven to two in favour of the scheme.\n")


def _write_xsum_manual_dir(path):
  """The builder's manual dir: the extracts tarball and the split file."""
  path.mkdir()
  (path / xsum.SPLIT_FILE).write_text(json.dumps(XSUM_IDS))
  with tarfile.open(path / xsum.TARBALL, "w:gz") as tar:
    for bbcid in sum(XSUM_IDS.values(), []):
      data = _xsum_data_file(bbcid).encode()
      info = tarfile.TarInfo(f"xsum-extracts-from-downloads/{bbcid}.data")
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return path


@pytest.fixture
def official_split_checksum(monkeypatch):
  """Registers the fake split file's checksum in place of the official one.

  NOTE: TFDS checks the split file against the checksum of the real XSum
  file; this is the only part of the builder the test replaces.
  """
  xsum.provide_importlib_resources()
  from tensorflow_datasets.core.download import checksums
  from tensorflow_datasets.summarization import xsum as tfds_xsum

  def register(split_file):
    monkeypatch.setattr(tfds_xsum.Xsum, "url_infos", {
        tfds_xsum._URL: checksums.compute_url_info(split_file)})

  return register


def test_xsum_from_manual_dir(tmp_path, official_split_checksum):
  data_dir = _write_xsum_manual_dir(tmp_path / "xsum")
  official_split_checksum(data_dir / xsum.SPLIT_FILE)
  task = tasks.get_task("xsum", data_dir=str(data_dir))
  assert tasks.get_task("xsum", data_dir=str(data_dir)) is task
  assert (data_dir / "tfds" / "xsum" / "1.1.0").is_dir()
  rows = {s: pipeline.text_examples("xsum", s, data_dir=str(data_dir))
          for s in ("train", "validation", "test")}
  assert {s: len(r) for s, r in rows.items()} == {
      s: len(ids) for s, ids in XSUM_IDS.items()}
  example = rows["validation"][0]
  assert example == {
      "inputs": "The bridge 36221704 will cross the river near the town "
                "centre.\nCouncillors voted seven to two in favour of the "
                "scheme.",
      "targets": "A council has approved plans for a new bridge, number "
                 "36221704."}
  # Deterministic order, and a prepared TFDS dir is read as it is.
  again = pipeline.text_examples("xsum", "train",
                                 data_dir=str(data_dir / "tfds"))
  assert again == rows["train"]
  batch = next(pipeline.batch_iterator(
      "xsum", "train", batch_size=2, input_length=32, target_length=16,
      seed=0, data_dir=str(data_dir)))
  assert batch["inputs"].shape == (2, 32)


def test_xsum_bad_dirs(tmp_path):
  with pytest.raises(UserError, match=re.escape(str(tmp_path / "none"))):
    tasks.get_task("xsum", data_dir=str(tmp_path / "none"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(UserError, match="lacks xsum-extracts"):
    tasks.get_task("xsum", data_dir=str(tmp_path / "empty"))
  data_dir = _write_xsum_manual_dir(tmp_path / "unofficial")
  with pytest.raises(UserError, match="not the official XSum split file"):
    tasks.get_task("xsum", data_dir=str(data_dir))


def test_missing_data_dir_env(monkeypatch):
  monkeypatch.delenv("REALIGN_TLDR_DIR", raising=False)
  with pytest.raises(UserError, match="REALIGN_TLDR_DIR"):
    tasks.get_task("tldr_sft")


# ---------------------------------------------------------- TL;DR SFT ----

def _sft_row(i, summary=None):
  return {"id": f"t3_{i}", "subreddit": "relationships",
          "title": f"Title {i}", "post": f"My post number {i}.\nSecond line.",
          "summary": f" short summary {i}" if summary is None else summary}


def _write_sft(path, sizes=(5, 2, 3)):
  path.mkdir()
  start = 0
  for name, n in zip(("train", "valid", "test"), sizes):
    with open(path / f"{name}.jsonl", "w") as f:
      for i in range(start, start + n):
        f.write(json.dumps(_sft_row(i)) + "\n")
    start += n
  return path


def test_tldr_sft(tmp_path):
  data_dir = _write_sft(tmp_path / "tldr")
  rows = pipeline.text_examples("tldr_sft", "validation",
                                data_dir=str(data_dir))
  assert rows == [
      {"inputs": "SUBREDDIT: r/relationships\nTITLE: Title 5\nPOST: My post "
                 "number 5.\nSecond line.\nTL;DR:",
       "targets": "short summary 5"},
      {"inputs": "SUBREDDIT: r/relationships\nTITLE: Title 6\nPOST: My post "
                 "number 6.\nSecond line.\nTL;DR:",
       "targets": "short summary 6"}]
  assert len(pipeline.text_examples("tldr_sft", "train",
                                    data_dir=str(data_dir))) == 5
  batch = next(pipeline.batch_iterator(
      "tldr_sft", "train", batch_size=3, input_length=48, target_length=8,
      seed=0, data_dir=str(data_dir)))
  assert batch["inputs"].shape == (3, 48) and batch["targets"].shape == (3, 8)


def test_tldr_sft_errors(tmp_path):
  data_dir = _write_sft(tmp_path / "tldr")
  (data_dir / "test.jsonl").unlink()
  with pytest.raises(UserError, match="lacks test.jsonl"):
    tasks.get_task("tldr_sft", data_dir=str(data_dir))
  data_dir = _write_sft(tmp_path / "tldr2")
  bad = _sft_row(9)
  del bad["post"]
  with open(data_dir / "train.jsonl", "a") as f:
    f.write(json.dumps(bad) + "\n")
  with pytest.raises(UserError, match=re.escape(
      f"{data_dir / 'train.jsonl'} row 6: missing field 'post'")):
    pipeline.text_examples("tldr_sft", "train", data_dir=str(data_dir))


# -------------------------------------------------- TL;DR comparisons ----

def _comparison(i, split, choice, texts=None):
  texts = texts or (f" summary A {i}", f" summary B {i}")
  return {
      "info": {"id": f"t3_{i}", "post": f"Post {i}.", "title": f"Title {i}",
               "subreddit": "tifu"},
      "summaries": [{"text": texts[0], "policy": "sup2", "note": None},
                    {"text": texts[1], "policy": "ref", "note": "ok"}],
      "choice": choice, "worker": "w1", "batch": "batch3", "split": split,
      "extra": {"confidence": 7},
  }


def _write_comparisons(path):
  path.mkdir()
  rows = [_comparison(0, "train", 0), _comparison(1, "valid1", 1),
          _comparison(2, "valid2", 0), _comparison(3, "train", 1),
          _comparison(4, "valid1", 0, texts=(" same", " same"))]
  (path / "batch3.json").write_text(
      "".join(json.dumps(r) + "\n" for r in rows))
  cnndm = {"info": {"id": "x", "article": "An article.", "site": "cnn"},
           "summaries": [{"text": "a"}, {"text": "b"}], "choice": 0,
           "split": "valid1", "batch": "batch0_cnndm"}
  (path / "batch0_cnndm.json").write_text(json.dumps(cnndm) + "\n")
  (path / "README.txt").write_text("not a batch file")
  return path


def test_tldr_comparisons(tmp_path):
  data_dir = str(_write_comparisons(tmp_path / "comparisons"))
  rows = pipeline.text_examples("tldr_comparisons", "validation",
                                data_dir=data_dir)
  # The CNN/DM row is not TL;DR, the identical pair is skipped.
  assert rows == [{"prompt": "SUBREDDIT: r/tifu\nTITLE: Title 1\nPOST: Post "
                             "1.\nTL;DR:",
                   "chosen": "summary B 1", "rejected": "summary A 1"}]
  train = pipeline.text_examples("tldr_comparisons", "train",
                                 data_dir=data_dir)
  assert [(r["chosen"], r["rejected"]) for r in train] == [
      ("summary A 0", "summary B 0"), ("summary B 3", "summary A 3")]
  test = pipeline.text_examples("tldr_comparisons", "test", data_dir=data_dir)
  assert test[0]["chosen"] == "summary A 2"
  batch = next(pipeline.batch_iterator(
      "tldr_comparisons", "train", batch_size=2, input_length=24,
      target_length=8, seed=0, data_dir=data_dir))
  assert set(batch) == {"inputs", "chosen", "rejected"}
  assert batch["chosen"].shape == batch["rejected"].shape == (2, 8)
  assert not np.array_equal(batch["chosen"], batch["rejected"])
  with pytest.raises(UserError, match=re.escape(
      f"{tmp_path / 'comparisons' / 'batch3.json'} row 5: 'chosen' and "
      "'rejected' are identical")):
    preferences.load_tldr_comparisons(data_dir, "validation")
  assert len(preferences.load_tldr_comparisons(
      data_dir, "validation", skip_invalid=True)[0]) == 1


def test_tldr_comparisons_errors(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(UserError, match=r"has no batch\*\.json files"):
    tasks.get_task("tldr_comparisons", data_dir=str(tmp_path / "empty"))
  bad_dir = tmp_path / "bad"
  bad_dir.mkdir()
  row = _comparison(0, "train", 2)
  (bad_dir / "batch1.json").write_text(json.dumps(row) + "\n{oops\n")
  with pytest.raises(UserError, match="row 1: field 'choice' must be 0 or 1"):
    preferences.load_tldr_comparisons(bad_dir, "train")
  with pytest.raises(UserError, match="batch1.json row 2: not valid JSON"):
    preferences.load_tldr_comparisons(bad_dir, "train", skip_invalid=True)


# ------------------------------------------------------- preferences ----

GOOD = {"prompt": "p", "chosen": "yes", "rejected": "no"}
BAD_ROWS = [
    ('{"prompt": "p", "chosen": "yes"}', "missing field 'rejected'"),
    ('{"prompt": "p", "chosen": 3, "rejected": "no"}',
     "field 'chosen' is not a string"),
    ('{"prompt": " ", "chosen": "a", "rejected": "b"}',
     "field 'prompt' is empty"),
    ('{"prompt": "p", "chosen": "a", "rejected": "a"}',
     "'chosen' and 'rejected' are identical"),
    ('{"prompt": "p", "chosen": "a", ', "not valid JSON"),
    ('["p", "a", "b"]', "expected a JSON object"),
]


def test_preference_jsonl_good_rows(tmp_path):
  path = tmp_path / "out" / "prefs.jsonl"
  rows = [GOOD, {**GOOD, "chosen": "ünïcode\nline", "extra": 1}]
  assert preferences.write_preference_jsonl(path, rows) == 2
  assert list(path.parent.iterdir()) == [path]  # No temp file left behind.
  loaded, skipped = preferences.load_preference_jsonl(path)
  assert skipped == 0
  assert loaded == [GOOD, {**GOOD, "chosen": "ünïcode\nline"}]


@pytest.mark.parametrize("line,problem", BAD_ROWS)
def test_preference_jsonl_bad_rows(tmp_path, line, problem):
  path = tmp_path / "prefs.jsonl"
  path.write_text(json.dumps(GOOD) + "\n\n" + line + "\n" + json.dumps(GOOD)
                  + "\n")
  with pytest.raises(UserError, match=re.escape(f"{path} row 3: {problem}")):
    preferences.load_preference_jsonl(path)
  rows, skipped = preferences.load_preference_jsonl(path, skip_invalid=True)
  assert rows == [GOOD, GOOD] and skipped == 1


def test_preference_write_rejects_bad_rows(tmp_path):
  path = tmp_path / "prefs.jsonl"
  with pytest.raises(UserError, match="row 2 written to"):
    preferences.write_preference_jsonl(path, [GOOD, {**GOOD, "rejected": 1}])
  assert not path.exists() and not list(tmp_path.iterdir())
  with pytest.raises(UserError, match=re.escape(str(tmp_path / "nope"))):
    preferences.load_preference_jsonl(tmp_path / "nope")


def test_preferences_task(tmp_path):
  for split in tasks.SPLITS:
    preferences.write_preference_jsonl(
        tmp_path / f"{split}.jsonl",
        [{**GOOD, "prompt": f"{split} {i}"} for i in range(3)])
  rows = pipeline.text_examples("preferences", "test", data_dir=str(tmp_path))
  assert [r["prompt"] for r in rows] == ["test 0", "test 1", "test 2"]
  (tmp_path / "other").mkdir()
  (tmp_path / "train.jsonl").rename(tmp_path / "other" / "train.jsonl")
  with pytest.raises(UserError, match="lacks validation.jsonl, test.jsonl"):
    tasks.get_task("preferences", data_dir=str(tmp_path / "other"))


# ------------------------------- Hugging Face datasets' shard files ----
# Written with pyarrow in the published schemas: EdinburghNLP/xsum (document,
# summary, id), the TL;DR SFT datasets (id, subreddit, title, post, summary) and
# openai/summarize_from_feedback's comparisons (info struct, summaries list of
# structs, choice int32, worker, batch, split, extra struct).

def _parquet(path, rows, schema):
  import pyarrow as pa
  import pyarrow.parquet as pq
  path.parent.mkdir(parents=True, exist_ok=True)
  pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def _xsum_schema(columns=("document", "summary", "id")):
  import pyarrow as pa
  return pa.schema([(c, pa.string()) for c in columns])


def _xsum_row(i):
  return {"document": f"Document {i} about the weather.\nMore text.",
          "summary": f"Summary {i}.", "id": str(36221700 + i)}


def test_xsum_hf_parquet_and_jsonl(tmp_path):
  root = tmp_path / "xsum_hf"
  # Two train shards (read in order), one each for validation and test.
  _parquet(root / "data" / "train-00000-of-00002.parquet", [_xsum_row(0), _xsum_row(1)],
           _xsum_schema())
  _parquet(root / "data" / "train-00001-of-00002.parquet", [_xsum_row(2)], _xsum_schema())
  _parquet(root / "data" / "validation-00000-of-00001.parquet", [_xsum_row(3)], _xsum_schema())
  _parquet(root / "data" / "test-00000-of-00001.parquet", [_xsum_row(4)], _xsum_schema())
  (root / ".cache").mkdir()
  (root / ".cache" / "train.jsonl").write_text("not a shard")  # a hub download's cache
  rows = pipeline.text_examples("xsum", "train", data_dir=str(root))
  assert rows == [{"inputs": _xsum_row(i)["document"], "targets": _xsum_row(i)["summary"]}
                  for i in range(3)]
  assert pipeline.text_examples("xsum", "test", data_dir=str(root))[0]["targets"] == (
      "Summary 4.")
  # JSON-lines shards (Dataset.to_json) give the same examples.
  jl = tmp_path / "xsum_jsonl"
  jl.mkdir()
  for split, ids in (("train", (0, 1, 2)), ("validation", (3,)), ("test", (4,))):
    (jl / f"{split}.jsonl").write_text("".join(json.dumps(_xsum_row(i)) + "\n" for i in ids))
  assert pipeline.text_examples("xsum", "train", data_dir=str(jl)) == rows


def test_xsum_hf_missing_column_and_split(tmp_path):
  root = tmp_path / "nosummary"
  for split in ("train", "validation", "test"):
    _parquet(root / f"{split}-00000-of-00001.parquet", [{"document": "d", "id": "1"}],
             _xsum_schema(("document", "id")))
  bad = root / "train-00000-of-00001.parquet"
  with pytest.raises(UserError, match=re.escape(f"{bad}: missing column 'summary'")):
    pipeline.text_examples("xsum", "train", data_dir=str(root))
  root = tmp_path / "notest"
  _parquet(root / "train-00000-of-00001.parquet", [_xsum_row(0)], _xsum_schema())
  _parquet(root / "validation-00000-of-00001.parquet", [_xsum_row(1)], _xsum_schema())
  with pytest.raises(UserError, match="none for the split.s. test"):
    tasks.get_task("xsum", data_dir=str(root))
  jl = tmp_path / "jl"
  jl.mkdir()
  for split in ("train", "validation", "test"):
    (jl / f"{split}.jsonl").write_text(json.dumps({"document": "d", "id": "1"}) + "\n")
  with pytest.raises(UserError, match=re.escape(f"{jl / 'train.jsonl'} row 1: missing column "
                                                "'summary'")):
    pipeline.text_examples("xsum", "train", data_dir=str(jl))


def test_tldr_sft_hf_parquet_matches_the_openai_files(tmp_path):
  import pyarrow as pa
  openai = _write_sft(tmp_path / "openai")
  schema = pa.schema([(c, pa.string()) for c in ("id", "subreddit", "title", "post", "summary")])
  hf = tmp_path / "hf"
  start = 0
  # The converted-parquet layout: <config>/<split>/NNNN.parquet.
  for split, n in (("train", 5), ("validation", 2), ("test", 3)):
    _parquet(hf / "default" / split / "0000.parquet",
             [_sft_row(i) for i in range(start, start + n)], schema)
    start += n
  for split in ("train", "validation", "test"):
    assert (pipeline.text_examples("tldr_sft", split, data_dir=str(hf))
            == pipeline.text_examples("tldr_sft", split, data_dir=str(openai)))
  bad = tmp_path / "bad"
  short = pa.schema([(c, pa.string()) for c in ("id", "subreddit", "title", "summary")])
  for split in ("train", "validation", "test"):
    _parquet(bad / f"{split}.parquet", [{k: v for k, v in _sft_row(0).items() if k != "post"}],
             short)
  with pytest.raises(UserError, match=re.escape(f"{bad / 'train.parquet'}: missing column "
                                                "'post'")):
    pipeline.text_examples("tldr_sft", "train", data_dir=str(bad))


def _comparison_schema():
  import pyarrow as pa
  s = pa.string()
  return pa.schema([
      ("info", pa.struct([("id", s), ("post", s), ("title", s), ("subreddit", s), ("site", s),
                          ("article", s)])),
      ("summaries", pa.list_(pa.struct([("text", s), ("policy", s), ("note", s)]))),
      ("choice", pa.int32()), ("worker", s), ("batch", s), ("split", s),
      ("extra", pa.struct([("confidence", pa.int32())])),
  ])


def test_tldr_comparisons_hf_parquet_matches_the_openai_files(tmp_path):
  openai = _write_comparisons(tmp_path / "openai")
  rows = [json.loads(line) for f in sorted(openai.glob("batch*.json"))
          for line in f.read_text().splitlines()]
  # HF puts train rows in the train split and valid1/valid2 rows in validation.
  hf = tmp_path / "hf"
  _parquet(hf / "comparisons" / "train-00000-of-00001.parquet",
           [r for r in rows if r["split"] == "train"], _comparison_schema())
  _parquet(hf / "comparisons" / "validation-00000-of-00001.parquet",
           [r for r in rows if r["split"] != "train"], _comparison_schema())
  for split in ("train", "validation", "test"):
    assert (pipeline.text_examples("tldr_comparisons", split, data_dir=str(hf))
            == pipeline.text_examples("tldr_comparisons", split, data_dir=str(openai)))
  assert len(pipeline.text_examples("tldr_comparisons", "train", data_dir=str(hf))) == 2
  # A shard without the `choice` column.
  import pyarrow as pa
  bad = tmp_path / "bad"
  schema = pa.schema([f for f in _comparison_schema() if f.name != "choice"])
  _parquet(bad / "train-00000-of-00001.parquet",
           [{k: v for k, v in rows[0].items() if k != "choice"}], schema)
  with pytest.raises(UserError, match=re.escape(f"{bad / 'train-00000-of-00001.parquet'}: "
                                                "missing column 'choice'")):
    preferences.load_tldr_comparisons(str(bad), "train")
