"""A run directory and a decode output on gs://, against a fake bucket.

`etils.epath.testing.mock_epath` puts epath's local backend behind every URI;
the fixture maps `gs://BUCKET/...` onto a folder of the test's tmp_path. The
tests run in tmp_path, so a URI taken for a local path would show up there as
a folder named `gs:` (checked after each test).

Orbax writes the arrays through TensorStore, which talks to GCS itself, not
through epath: the training and decode tests hand orbax the bucket's local
folder (`_OrbaxInBucket`), so the checkpoints land in the fake bucket too;
everything else of the run directory goes through realign_jax.plumbing.paths as a
gs:// URI.
"""

import json
import logging
import os

import numpy as np
import pytest

from realign_jax.plumbing import gin_utils
from realign_jax.plumbing import paths
from realign_jax.checkpoints import manager as ckpt_lib
from realign_jax.checkpoints import run_dir
from realign_jax.plumbing.errors import UserError
from realign_jax.training import metrics as metrics_lib
from tests import test_run_dir

RUN = "gs://bucket/run"


class FakeBucket:
  """gs://bucket/... mapped onto `root`/bucket/..."""

  def __init__(self, root):
    self.root = root

  def local(self, path) -> str:
    path = os.fspath(path)
    return str(self.root / path[len("gs://"):]) if path.startswith("gs://") else path

  def remote(self, path) -> str:
    path, prefix = os.fspath(path), str(self.root) + os.sep
    return "gs://" + path[len(prefix):] if path.startswith(prefix) else path

  def file(self, uri: str):
    return self.root / uri[len("gs://"):]


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  from etils.epath import gpath, testing
  fake = FakeBucket(tmp_path / "store")
  (fake.root / "bucket").mkdir(parents=True)
  monkeypatch.chdir(tmp_path)
  # NOTE: with TensorFlow installed epath sends gs:// to tf.io.gfile, past the mock.
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)

  def one(original, path, *args, **kwargs):
    return original(fake.local(path), *args, **kwargs)

  def open_(original, path, mode):
    if "r" not in mode:  # an object needs no folder: write as GCS does, under any prefix
      os.makedirs(os.path.dirname(fake.local(path)), exist_ok=True)
    return original(fake.local(path), mode)

  def two(original, path, dst, *args, **kwargs):
    return original(fake.local(path), fake.local(dst), *args, **kwargs)

  def glob(original, pattern):
    found = original(fake.local(pattern))
    return [fake.remote(p) for p in found] if paths.is_remote(pattern) else found

  def walk(original, top, **kwargs):
    for root, dirs, files in original(fake.local(top), **kwargs):
      yield (fake.remote(root) if paths.is_remote(top) else root), dirs, files

  with testing.mock_epath(
      open=open_, exists=one, isdir=one, listdir=one, makedirs=one, mkdir=one, remove=one,
      rmtree=one, stat=one, rename=two, replace=two, copy=two, glob=glob, walk=walk):
    yield fake
  assert not (tmp_path / "gs:").exists(), "a gs:// path was written as a local one"


def _names(folder) -> list:
  return sorted(os.listdir(folder))


# ---- the file layer -------------------------------------------------------------------
def test_paths_on_a_bucket(bucket):
  d = f"{RUN}/sub"
  assert paths.is_remote(d) and not paths.is_remote("runs/x") and not paths.exists(d)
  assert paths.abspath(d) == d
  paths.makedirs(d)
  paths.makedirs(d)  # exists: fine
  assert paths.isdir(d)
  paths.atomic_write_text(f"{d}/a.txt", "héllo\n")
  paths.atomic_write_bytes(f"{d}/b.bin", b"\0\1")
  paths.append_text(f"{d}/log.jsonl", "1\n")
  paths.append_text(f"{d}/log.jsonl", "2\n")
  # one write per object: no temporary object left beside them
  assert paths.listdir(d) and sorted(paths.listdir(d)) == ["a.txt", "b.bin", "log.jsonl"]
  assert paths.read_text(f"{d}/a.txt") == "héllo\n" and paths.getsize(f"{d}/b.bin") == 2
  assert paths.read_text(f"{d}/log.jsonl") == "1\n2\n"
  assert paths.isfile(f"{d}/a.txt") and not paths.isfile(d)
  paths.move(d, f"{RUN}/moved")
  assert not paths.exists(d) and paths.isfile(f"{RUN}/moved/a.txt")
  with pytest.raises(OSError):
    paths.move(f"{RUN}/moved", "local_dir")
  paths.remove(f"{RUN}/moved/a.txt")
  with pytest.raises(FileNotFoundError):
    paths.remove(f"{RUN}/moved/a.txt")
  paths.rmtree(f"{RUN}/moved")
  paths.rmtree(f"{RUN}/moved", ignore_errors=True)
  assert not paths.exists(f"{RUN}/moved")
  assert _names(bucket.root / "bucket" / "run") == []


def test_local_atomic_write_is_unchanged(tmp_path):
  # the temporary file beside the target, renamed over it: the umask's mode, no leftovers
  target = tmp_path / "out.json"
  paths.atomic_write_text(str(target), "new")
  plain = tmp_path / "plain"
  plain.write_text("x")
  assert target.read_text() == "new" and _names(tmp_path) == ["out.json", "plain"]
  assert target.stat().st_mode == plain.stat().st_mode
  with pytest.raises(IsADirectoryError):
    paths.atomic_write_text(str(tmp_path), "x")
  assert _names(tmp_path) == ["out.json", "plain"]


# ---- the run directory's records --------------------------------------------------------
def test_run_records_on_a_bucket(bucket, caplog):
  from tests.helpers import TINY_BUILTIN
  cfg = TINY_BUILTIN["t5"]
  run_dir.check_run_dir(RUN)  # absent: fine
  vocab = run_dir.vocabulary_identity(None)
  run_dir.write_model_json(RUN, cfg, vocab=vocab)
  assert json.loads(bucket.file(f"{RUN}/model.json").read_text())["family"] == cfg.family
  assert ckpt_lib.read_model_json(RUN) == (cfg, "lm")
  assert run_dir.recorded_vocabulary(RUN) == vocab
  run_dir.check_vocabulary(RUN, vocab, None)

  # the recorded config: written at the start, a change refused, an allowed one recorded
  run_dir.check_resume_config(RUN, "a.x = 1\n", step=0)
  with pytest.raises(UserError, match=r"a.x = 1 there, 2 now"):
    run_dir.check_resume_config(RUN, "a.x = 2\n", step=3)
  run_dir.check_resume_config(RUN, "a.x = 2\n", step=3, allow_change=True)
  run_dir.check_resume_config(RUN, "a.x = 3\n", step=5, allow_change=True)
  assert bucket.file(f"{RUN}/{run_dir.RUN_CONFIG}").read_text() == "a.x = 3\n"
  changes = [json.loads(x) for x in
             bucket.file(f"{RUN}/{run_dir.CONFIG_CHANGES}").read_text().splitlines()]
  assert [c["step"] for c in changes] == [3, 5]

  # no lock on an object store: one warning, nothing written
  with caplog.at_level(logging.WARNING):
    with run_dir.RunLock(RUN):
      assert not bucket.file(f"{RUN}/{run_dir.LOCK_FILE}").exists()
  assert any("is not locked" in r.getMessage() for r in caplog.records)

  path = gin_utils.write_operative_config(RUN)
  assert path == f"{RUN}/config.gin" and bucket.file(path).exists()
  path = gin_utils.write_operative_config_beside("gs://bucket/out/dera.jsonl")
  assert path == "gs://bucket/out/dera.jsonl.config.gin" and bucket.file(path).exists()

  # a file where MODEL_DIR should be
  bucket.file("gs://bucket/afile").write_text("x")
  with pytest.raises(UserError, match="MODEL_DIR gs://bucket/afile exists and is not a dir"):
    run_dir.check_run_dir("gs://bucket/afile")


def test_metrics_and_tensorboard_on_a_bucket(bucket, monkeypatch):
  from tensorboardX import record_writer
  # NOTE: the writer registers its gs:// event files with tensorboardX: undone after the test
  monkeypatch.setitem(record_writer.REGISTERED_FACTORIES, "gs",
                      record_writer.REGISTERED_FACTORIES["gs"])
  w = metrics_lib.MetricsWriter(RUN)
  for step in (1, 2, 3):
    w.write(step, {"loss": np.float32(1.0 / step)})
  w.write_samples(2, [{"prompt": "p", "sample": "s"}])
  w.close()
  assert [r["step"] for r in w.read_rows("train")] == [1, 2, 3]
  assert bucket.file(f"{RUN}/samples.jsonl").exists()
  events = _names(bucket.file(f"{RUN}/tb"))
  assert len(events) == 1 and events[0].startswith("events.out.tfevents")
  assert bucket.file(f"{RUN}/tb/{events[0]}").stat().st_size > 0
  # a resume at step 2 drops what was logged after it
  w = metrics_lib.MetricsWriter(RUN, resume_step=2, tensorboard=False)
  assert [r["step"] for r in w.read_rows("train")] == [1, 2]
  assert _names(bucket.file(RUN)) == ["metrics.jsonl", "samples.jsonl", "tb"]


def test_jsonl_readers_on_a_bucket(bucket):
  from realign_jax.data import jsonl
  from realign_jax.evaluation import records
  bucket.file("gs://bucket/rows.jsonl").write_text(
      json.dumps({"prompt": "p", "response": "r", "kl": 0.1, "log_ratio": 0.2}) + "\n\n")
  assert list(jsonl.iter_json_lines("gs://bucket/rows.jsonl"))[0][0] == 1
  assert len(records.read_decode_file("gs://bucket/rows.jsonl")) == 1
  with pytest.raises(UserError, match="decode file gs://bucket/none.jsonl not found"):
    records.read_decode_file("gs://bucket/none.jsonl")
  with pytest.raises(UserError, match="cannot read gs://bucket/none.jsonl"):
    list(jsonl.iter_json_lines("gs://bucket/none.jsonl"))
  bucket.file("gs://bucket/obj.json").write_text('{"a": 1}')
  assert jsonl.read_json_object("gs://bucket/obj.json") == {"a": 1}


# ---- the training binary and the decoder, MODEL_DIR = gs://bucket/run -------------------
class _OrbaxInBucket:
  """orbax.checkpoint, with a CheckpointManager writing into the fake bucket's folder."""

  def __init__(self, fake):
    import orbax.checkpoint as ocp
    self._ocp, self._fake = ocp, fake

  def __getattr__(self, name):
    return getattr(self._ocp, name)

  def CheckpointManager(self, directory, *args, **kwargs):  # noqa: N802
    return self._ocp.CheckpointManager(self._fake.local(directory), *args, **kwargs)


def _tiny_sft_args(model_dir, *extra):
  return test_run_dir._tiny_sft_args(model_dir, "--gin.TrainerConfig.log_every=1", *extra)


def test_train_and_decode_into_a_bucket(bucket, monkeypatch):
  from tensorboardX import record_writer

  from realign_jax import decode as decode_bin
  from realign_jax import train as train_bin
  from realign_jax.decoding import sampler
  from realign_jax.inference.methods_dera import DeRa
  monkeypatch.setitem(record_writer.REGISTERED_FACTORIES, "gs",
                      record_writer.REGISTERED_FACTORIES["gs"])
  monkeypatch.setattr(ckpt_lib, "ocp", _OrbaxInBucket(bucket))
  run = bucket.file(RUN)
  # NOTE: one run (a resume compiles again: ~doubles the test's time); what a
  # resume reads of the run directory is checked below without it.
  assert train_bin.main(_tiny_sft_args(RUN, "--gin.TRAIN_STEPS=2")) == 0
  assert _names(run) == ["checkpoints", "config.gin", "metrics.jsonl", "model.json",
                         "run_config.gin", "tb"]
  assert _names(run / "checkpoints") == ["1", "2"]
  rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2]
  assert len(_names(run / "tb")) == 1
  assert run_dir.RunDir(RUN).checkpoint_steps() == [1, 2]
  assert ckpt_lib._step_problem(f"{RUN}/checkpoints/2") is None
  (run / "checkpoints" / "3").mkdir()
  assert ckpt_lib._step_problem(f"{RUN}/checkpoints/3") == "is an empty directory, not a checkpoint"
  # a broken step set aside into MODEL_DIR/broken_checkpoints
  ck = ckpt_lib.Checkpointer(RUN, keep=3, async_save=False)
  ck._set_aside([ckpt_lib.BrokenCheckpoint(3, ck.step_dir(3), "is empty")], resumed=2)
  ck.close()
  assert _names(run / "checkpoints") == ["1", "2"] and _names(run / "broken_checkpoints") == ["3"]

  # the decoder reads the run from the bucket and writes its rows there
  bucket.file("gs://bucket/prompts.jsonl").write_text(
      "".join(json.dumps({"prompt": p}) + "\n" for p in ["Return the length.", "Open a file."]))
  out = "gs://bucket/out/dera.jsonl"
  decode_bin.decode(ref_checkpoint=RUN, method=DeRa(lambdas=[0.0]), output_file=out,
                    prompt_file="gs://bucket/prompts.jsonl", input_length=16,
                    batch_size=2, sampling=sampler.SamplingConfig(max_new_tokens=3),
                    progress=False)
  rows = [json.loads(x) for x in bucket.file(out).read_text().splitlines()]
  assert len(rows) == 2 and {r["prompt"] for r in rows} == {"Return the length.", "Open a file."}
  assert _names(bucket.file("gs://bucket/out")) == ["dera.jsonl"]
  with pytest.raises(UserError, match="OUTPUT_FILE gs://bucket/out is a directory"):
    decode_bin.decode(ref_checkpoint=RUN, method=DeRa(lambdas=[0.0]),
                      output_file="gs://bucket/out", prompt_file="gs://bucket/prompts.jsonl",
                      input_length=16,
                      batch_size=2, sampling=sampler.SamplingConfig(max_new_tokens=3),
                      progress=False)


def test_output_file_check_accepts_a_bucket_and_refuses_a_folder(bucket):
  # decode and evaluate check OUTPUT_FILE before any compute: a URI needs no local folder.
  from realign_jax.plumbing import config_check
  from realign_jax.plumbing.errors import UserError
  config_check.check_output_file(f"{RUN}/out/eval.json")
  paths.makedirs(f"{RUN}/out/eval.json")
  with pytest.raises(UserError, match="is a directory"):
    config_check.check_output_file(f"{RUN}/out/eval.json")
  with pytest.raises(UserError, match="does not exist"):
    config_check.check_output_file("no_such_local_dir/eval.json")
