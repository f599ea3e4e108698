"""Run-directory ownership (lock), the recorded config and the vocabulary's identity."""

import json
import os
import subprocess
import sys

import pytest

from realign_jax.checkpoints import run_dir
from realign_jax.data import vocab as vocab_lib
from realign_jax.plumbing.errors import UserError


# ---- lock -------------------------------------------------------------------------
def test_lock_refuses_a_live_owner_and_takes_over_a_dead_one(tmp_path, caplog):
  with run_dir.RunLock(str(tmp_path)):
    owner = json.loads((tmp_path / run_dir.LOCK_FILE).read_text())
    assert owner["pid"] == os.getpid()
    with pytest.raises(UserError, match=rf"in use by pid {os.getpid()} on this host"):
      run_dir.RunLock(str(tmp_path)).acquire()
  assert not (tmp_path / run_dir.LOCK_FILE).exists()  # released

  # a lock left by a process that has exited is stale
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  pid = int(dead.stdout)
  import socket
  (tmp_path / run_dir.LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(),
                                                        "pid": pid}))
  with caplog.at_level("WARNING"):
    with run_dir.RunLock(str(tmp_path)):
      assert json.loads((tmp_path / run_dir.LOCK_FILE).read_text())["pid"] == os.getpid()
  assert any("stale lock" in r.getMessage() and str(pid) in r.getMessage() for r in caplog.records)


def test_lock_from_another_host_names_the_host_and_the_file(tmp_path):
  (tmp_path / run_dir.LOCK_FILE).write_text(json.dumps({"host": "node-17", "pid": 1}))
  with pytest.raises(UserError, match=r"pid 1 on host node-17 .*delete the lock file"):
    run_dir.RunLock(str(tmp_path)).acquire()
  assert (tmp_path / run_dir.LOCK_FILE).exists()  # not ours to remove


# ---- recorded config ------------------------------------------------------------------
CONFIG = """# Macros:
# ==============================================================================
MODEL_DIR = 'runs/a'
TRAIN_STEPS = 20

# Parameters for make_optimizer:
# ==============================================================================
make_optimizer.learning_rate = 0.001
make_optimizer.total_steps = %TRAIN_STEPS

# Parameters for SFT:
# ==============================================================================
SFT.batch_size = 32
SFT.lambdas = [0.0,
               0.5]
"""


def test_parse_bindings_joins_continuations_and_drops_comments():
  b = run_dir.parse_bindings(CONFIG)
  assert b["SFT.lambdas"] == "[0.0, 0.5]"
  assert b["make_optimizer.learning_rate"] == "0.001" and b["TRAIN_STEPS"] == "20"
  assert not any(k.startswith("#") for k in b)


def test_resume_under_another_config_is_refused_unless_allowed(tmp_path):
  d = str(tmp_path)
  run_dir.check_resume_config(d, CONFIG, step=0)  # recorded at the start
  assert (tmp_path / run_dir.RUN_CONFIG).read_text() == CONFIG
  # more steps and another spelling of the run directory: a resume
  longer = CONFIG.replace("TRAIN_STEPS = 20", "TRAIN_STEPS = 40").replace("'runs/a'", "'/x/a'")
  run_dir.check_resume_config(d, longer, step=20)
  other_lr = CONFIG.replace("learning_rate = 0.001", "learning_rate = 0.01")
  with pytest.raises(UserError, match=r"make_optimizer.learning_rate = 0.001 there, 0.01 now"):
    run_dir.check_resume_config(d, other_lr, step=20)
  added = CONFIG + "SFT.target_length = 8\n"
  with pytest.raises(UserError, match=r"SFT.target_length = \(unset\) there, 8 now"):
    run_dir.check_resume_config(d, added, step=20)
  assert not (tmp_path / run_dir.CONFIG_CHANGES).exists()
  # deliberately: recorded, and the new config becomes the run's
  run_dir.check_resume_config(d, other_lr, step=20, allow_change=True)
  rows = [json.loads(x) for x in (tmp_path / run_dir.CONFIG_CHANGES).read_text().splitlines()]
  assert rows[0]["step"] == 20
  assert rows[0]["changes"] == [{"binding": "make_optimizer.learning_rate", "old": "0.001",
                                 "new": "0.01"}]
  run_dir.check_resume_config(d, other_lr, step=30)  # now the recorded one


# ---- vocabulary -------------------------------------------------------------------------
def test_another_vocabulary_is_refused_unless_overridden(tmp_path):
  builtin = run_dir.vocabulary_identity(None)
  assert builtin["path"] == run_dir.BUILTIN_VOCAB and len(builtin["sha256"]) == 64
  run_dir.check_vocabulary("runs/x", builtin, None)
  run_dir.check_vocabulary("runs/x", None, None)  # written before vocabularies were recorded
  other = tmp_path / "other.model"
  data = bytearray(open(vocab_lib.BUILTIN_VOCAB_PATH, "rb").read())
  other.write_bytes(bytes(data) + b"\0")  # one byte more: another file
  with pytest.raises(UserError, match=r"runs/x was trained with vocabulary built-in .* not "
                                      rf"{other}"):
    run_dir.check_vocabulary("runs/x", builtin, str(other), where="decode")
  run_dir.check_vocabulary("runs/x", builtin, str(other), allow_other=True)
  # the same file under another path is the same vocabulary
  same = tmp_path / "copy.model"
  same.write_bytes(bytes(data))
  run_dir.check_vocabulary("runs/x", builtin, str(same))


# ---- through the training binary ------------------------------------------------------
def _tiny_sft_args(model_dir, *extra):
  return [f"--gin_file={os.path.join(REPO_ROOT, 'configs', 'sft', 'builtin_tiny.gin')}",
          f"--gin.MODEL_DIR='{model_dir}'", "--gin.T5Config.d_model=16",
          "--gin.T5Config.num_heads=2", "--gin.T5Config.head_dim=8", "--gin.T5Config.d_ff=32",
          "--gin.T5Config.num_encoder_layers=1", "--gin.T5Config.num_decoder_layers=1",
          "--gin.SFT.batch_size=8", "--gin.SFT.input_length=16", "--gin.SFT.target_length=4",
          "--gin.SFT.max_eval_examples=4", "--gin.SFT.num_eval_samples=0",
          "--gin.TrainerConfig.eval_every=0", "--gin.TrainerConfig.progress=False",
          "--gin.TrainerConfig.checkpoint_every=1", *extra]


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_binary_locks_records_and_refuses(tmp_path):
  from realign_jax import train as train_bin
  d = tmp_path / "run"
  assert train_bin.main(_tiny_sft_args(d, "--gin.TRAIN_STEPS=1")) == 0
  doc = json.loads((d / "model.json").read_text())
  assert doc["vocab"] == run_dir.vocabulary_identity(None)
  assert (d / run_dir.RUN_CONFIG).exists() and not (d / run_dir.LOCK_FILE).exists()
  # a longer run resumes; another learning rate is refused, nothing trained
  assert train_bin.main(_tiny_sft_args(d, "--gin.TRAIN_STEPS=2")) == 0
  with pytest.raises(UserError, match=r"make_optimizer.learning_rate = .* there, 0.5 now"):
    train_bin.main(_tiny_sft_args(d, "--gin.TRAIN_STEPS=3",
                                  "--gin.make_optimizer.learning_rate=0.5"))
  assert sorted(os.listdir(d / "checkpoints")) == ["1", "2"]
  # another vocabulary is refused on resume
  other = tmp_path / "other.model"
  other.write_bytes(open(vocab_lib.BUILTIN_VOCAB_PATH, "rb").read() + b"\0")
  with pytest.raises(UserError, match=r"resume: .* trained with vocabulary built-in"):
    train_bin.main(_tiny_sft_args(d, "--gin.TRAIN_STEPS=3", f"--gin.SFT.vocab_path='{other}'"))
  # a run holding the directory (a live process: this test's parent)
  import socket
  (d / run_dir.LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(),
                                                 "pid": os.getppid()}))
  with pytest.raises(UserError, match="is in use by pid"):
    train_bin.main(_tiny_sft_args(d, "--gin.TRAIN_STEPS=3"))
  (d / run_dir.LOCK_FILE).unlink()
  # deliberately under the new config: recorded
  assert train_bin.main(_tiny_sft_args(d, "--gin.TRAIN_STEPS=3",
                                       "--gin.make_optimizer.learning_rate=0.5",
                                       "--gin.train.allow_config_change=True")) == 0
  rows = [json.loads(x) for x in (d / run_dir.CONFIG_CHANGES).read_text().splitlines()]
  assert rows[0]["step"] == 2 and rows[0]["changes"][0]["binding"] == (
      "make_optimizer.learning_rate")


RECORDS = ("model.json", run_dir.RUN_CONFIG, run_dir.OPERATIVE_CONFIG, run_dir.CHECKPOINT_SUBDIR)


def test_a_refused_start_leaves_model_dir_as_it_was(tmp_path):
  """A wrong INIT_CHECKPOINT writes nothing, so the corrected command is not refused."""
  from realign_jax import train as train_bin
  base = tmp_path / "base"
  assert train_bin.main(_tiny_sft_args(base, "--gin.TRAIN_STEPS=1")) == 0
  d = tmp_path / "run"
  init = lambda path: f"--gin.INIT_CHECKPOINT='{path}'"
  # missing: refused before anything is built; MODEL_DIR was not there and is not now
  with pytest.raises(UserError, match=r"INIT_CHECKPOINT .*nope does not exist"):
    train_bin.main(_tiny_sft_args(d, "--gin.TRAIN_STEPS=1", init(tmp_path / "nope")))
  assert not d.exists()
  # a model of another size: named by its setting, in a MODEL_DIR that exists already
  d.mkdir()
  with pytest.raises(UserError, match=r"INIT_CHECKPOINT .*base holds a model of another size: "
                                      r"d_model=16 there, 32 in this run's model config"):
    train_bin.main(_tiny_sft_args(d, "--gin.TRAIN_STEPS=1", "--gin.T5Config.d_model=32",
                                  init(base)))
  assert os.listdir(d) == []
  # a run directory without checkpoints: found when the trainer loads it, still before the start
  empty = tmp_path / "no_checkpoints"
  empty.mkdir()
  (empty / "model.json").write_text((base / "model.json").read_text())
  with pytest.raises(UserError, match=r"no checkpoint directory at .*no_checkpoints"):
    train_bin.main(_tiny_sft_args(d, "--gin.TRAIN_STEPS=1", init(empty)))
  assert os.listdir(d) == []
  # the corrected command starts, and records the run
  assert train_bin.main(_tiny_sft_args(d, "--gin.TRAIN_STEPS=1", init(base))) == 0
  assert all((d / name).exists() for name in RECORDS)
  assert sorted(os.listdir(d / "checkpoints")) == ["1"]
  assert not (d / run_dir.CONFIG_CHANGES).exists()
