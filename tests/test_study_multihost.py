"""The studies on several processes, and with MODEL_DIR on gs://.

(a) The length-reward study at the smoke size of tests/test_experiments.py on
2 processes x 4 CPU devices (SLURM variables, coordinator on 127.0.0.1) and, in
this process, on its 8 devices: the same results.json (timings aside); each
study file written once, by process 0; process 1 writes nothing into MODEL_DIR. Each of
the two processes runs under an audit hook (`HOOK`) that logs each file it opens for
writing, renames, creates or removes under MODEL_DIR; a write goes through an
`open` event, so none can escape it. Then a rerun with a changed setting must
fail on both processes with the same one line, not hang.

(b) In process, against the fake bucket of tests/test_remote_paths.py: a stage
cached and read back, and the study outputs (results, report, a figure) in a
gs:// MODEL_DIR, nothing in a local `gs:` folder.
"""

import json
import math
import os

import pytest

from realign_jax.plumbing import paths
from realign_jax.plumbing.errors import UserError
from realign_jax.experiments import report as rep
from realign_jax.experiments import stages as stages_lib
from realign_jax.experiments.length_reward.__main__ import main as lr_main
from tests import multiprocess
from tests.helpers import run_main
from tests.test_experiments import LR_GIN, SMOKE
from tests.test_remote_paths import bucket  # noqa: F401  (the fixture)

TIMEOUT_S = 300
# The devices of each of the two processes: 2 x 4, the 8 of this process's run.
DEVICES_EACH = 4
STUDY_FILES = ("stage.json", "samples.jsonl", "results.json", "report.md")

# NOTE: argv = [MODEL_DIR, LOG, study args...]; the log is opened before the
# hook is installed and written with os.write (no audit event of its own).
HOOK = r"""
import os, runpy, sys
model_dir, log = sys.argv[1], sys.argv[2]
sys.argv = ["length_reward"] + sys.argv[3:]
fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
root = os.path.realpath(model_dir)
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

def inside(p):
  if isinstance(p, int):
    return None
  p = os.path.realpath(os.fsdecode(p))
  return p if p == root or p.startswith(root + os.sep) else None

def hook(event, args):
  try:
    if event == "open":
      hit = inside(args[0]) if (args[2] or 0) & WRITE else None
    elif event == "os.rename":
      hit = inside(args[1])
    elif event in ("os.remove", "os.mkdir", "os.rmdir", "shutil.rmtree", "os.symlink"):
      hit = inside(args[0])
    else:
      return
    if hit:
      os.write(fd, f"{event}\t{os.path.relpath(hit, root)}\n".encode())
  except Exception:
    pass

sys.addaudithook(hook)
runpy.run_module("realign_jax.experiments.length_reward", run_name="__main__", alter_sys=True)
"""


def _study_args(model_dir, extra=()) -> list:
  return [f"--gin_file={LR_GIN}", f"--gin.MODEL_DIR='{model_dir}'"] + [
      f"--gin.{b}" for b in list(SMOKE) + list(extra)]


def _hooked(model_dir, log, extra=()) -> list:
  return ["-c", HOOK, str(model_dir), str(log)] + _study_args(model_dir, extra)


def _events(log) -> list:
  if not os.path.exists(log):
    return []
  with open(log) as f:
    return [line.rstrip("\n").split("\t") for line in f if line.strip()]


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
  """The 2-process study and, meanwhile, the 1-process one; then the 2-process refusal.

  NOTE: the 1-process study runs in this process, through the study's main(argv) on
  the 8 test devices (the 2 processes have 4 each): tests/test_experiments.py runs the
  same smoke study in process, so the run's compilation cache holds its programs once,
  and no process start (about 7 CPU-s of imports) is spent on it.
  """
  tmp = tmp_path_factory.mktemp("study_multihost")
  one_dir, two_dir = tmp / "one", tmp / "two"
  job, job2 = multiprocess.slurm_job_ids(2)
  two = multiprocess.start_two(lambda rank: _hooked(two_dir, tmp / f"two.p{rank}.log"),
                               str(tmp / "study"), job_id=job, devices_each=DEVICES_EACH)
  try:
    assert run_main(lr_main, _study_args(one_dir)) == 0
  finally:
    multiprocess.wait_all(two, TIMEOUT_S)
  multiprocess.assert_all_succeeded(two)
  events = {rank: _events(tmp / f"two.p{rank}.log") for rank in (0, 1)}
  # A changed training setting: refused on both processes, with the same line.
  refused = multiprocess.wait_all(multiprocess.start_two(
      lambda rank: _hooked(two_dir, tmp / f"refused.p{rank}.log", ["PPO_STEPS = 2"]),
      str(tmp / "refused"), job_id=job2, devices_each=DEVICES_EACH), TIMEOUT_S)
  return {"one": one_dir, "two": two_dir, "events": events, "refused": refused, "tmp": tmp}


def _same(a, b, where="results") -> None:
  """Equal JSON trees, numbers to 1e-6, timings (keys with 'seconds') skipped."""
  if isinstance(a, dict):
    assert isinstance(b, dict) and set(a) == set(b), where
    for k in a:
      if "seconds" not in k:
        _same(a[k], b[k], f"{where}.{k}")
  elif isinstance(a, list):
    assert isinstance(b, list) and len(a) == len(b), where
    for i, (x, y) in enumerate(zip(a, b)):
      _same(x, y, f"{where}[{i}]")
  elif isinstance(a, float) or isinstance(b, float):
    assert a is not None and b is not None, where
    assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-6, rel=1e-6), \
        f"{where}: {a} vs {b}"
  else:
    assert a == b, where


def test_two_processes_give_the_one_process_results(studies):
  one = json.loads((studies["one"] / "results.json").read_text())
  two = json.loads((studies["two"] / "results.json").read_text())
  assert two["stages_run_now"] == ["sft", "eval_sft", "ppo_beta0.1", "dera_sweep",
                                   "eval_ppo_beta0.1"]
  _same(one, two)
  for name in two["figures"].values():
    assert (studies["two"] / name).stat().st_size > 0
  # The samples, row for row: the same tokens and rewards. NOTE: the KLs only
  # to 1e-5: the PPO models trained on 1 and 2 processes differ in the last
  # bits (the gradients summed in another order), which moves a row's KL of
  # ~5e-4 by ~1e-6; the means in results.json stay within 1e-6.
  for stage in ("eval_sft", "dera_sweep", "eval_ppo_beta0.1"):
    one_rows = stages_lib.read_jsonl(str(studies["one"] / stage / "samples.jsonl"))
    two_rows = stages_lib.read_jsonl(str(studies["two"] / stage / "samples.jsonl"))
    assert len(one_rows) == len(two_rows) > 0
    for a, b in zip(one_rows, two_rows):
      assert {k: v for k, v in a.items() if k not in ("kl", "log_ratio")} == \
          {k: v for k, v in b.items() if k not in ("kl", "log_ratio")}
      assert (a["kl"], a["log_ratio"]) == pytest.approx((b["kl"], b["log_ratio"]), abs=1e-5)


# NOTE: what the training stages' processes > 0 do themselves (train.train, not the
# study): orbax's multi-process checkpoint protocol (each process's array metadata
# under checkpoints/) and the run directory made by its checkpoint manager.
TRAIN_RUNS = ("sft", "ppo_beta0.1")


def _trainers_own(event, path) -> bool:
  top = path.split(os.sep)[0]
  return top in TRAIN_RUNS and (path.startswith(f"{top}/checkpoints/") or
                                (event == "os.mkdir" and path == top))


def test_process_zero_writes_each_study_file_once_and_process_one_nothing(studies):
  ones = [e for e in studies["events"][1] if not _trainers_own(*e)]
  assert ones == [], ones[:5]
  finals = [path for event, path in studies["events"][0] if event == "os.rename"
            and (os.path.basename(path) in STUDY_FILES or path.endswith(".png"))]
  assert len(finals) == len(set(finals)), sorted(finals)
  assert sum(os.path.basename(p) == "stage.json" for p in finals) == 5
  assert {"results.json", "report.md", "fig2a_reward_vs_lambda.png"} <= set(finals)


def test_changed_setting_fails_alike_on_every_process(studies):
  lines = []
  for r in studies["refused"]:
    assert r.returncode == 2, r.describe()
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, r.describe()
    lines.append(errors[0])
  assert lines[0] == lines[1] and "ppo_beta0.1" in lines[0] and "other settings" in lines[0]
  # nothing written (os.makedirs of MODEL_DIR, which exists, is an os.mkdir event)
  assert [e for rank in (0, 1) for e in _events(studies["tmp"] / f"refused.p{rank}.log")
          if e != ["os.mkdir", "."]] == []


# ---- gs:// ----------------------------------------------------------------------------
def test_stages_and_outputs_in_a_bucket(bucket):  # noqa: F811
  root = "gs://bucket/study"
  calls = []

  def fn(d):
    calls.append(d)
    stages_lib.write_jsonl(os.path.join(d, "samples.jsonl"), [{"x": 1}, {"x": 2}])
    return {"value": 7}

  files = lambda result: ["samples.jsonl"]
  r1 = stages_lib.StageRunner(root, log=lambda s: None)
  assert r1.run("a", {"k": 1}, fn, files=files) == {"value": 7}
  assert calls == [f"{root}/a"] and r1.ran == ["a"]
  assert json.loads(bucket.file(f"{root}/a/stage.json").read_text())["result"] == {"value": 7}
  r2 = stages_lib.StageRunner(root, log=lambda s: None)
  assert r2.run("a", {"k": 1}, fn, files=files) == {"value": 7}
  assert len(calls) == 1 and r2.ran == [] and r2.is_done("a", {"k": 1})
  assert stages_lib.read_jsonl(f"{root}/a/samples.jsonl") == [{"x": 1}, {"x": 2}]
  with pytest.raises(UserError, match="stage a in gs://bucket/study was run with other"):
    r2.run("a", {"k": 2}, fn, files=files)
  # a missing output: the stage runs again
  paths.remove(f"{root}/a/samples.jsonl")
  assert stages_lib.StageRunner(root, log=lambda s: None).run("a", {"k": 1}, fn,
                                                              files=files) == {"value": 7}
  assert len(calls) == 2
  r2.reset("a")
  assert not paths.exists(f"{root}/a")

  fig = rep.plot_lambda_curves(f"{root}/curve.png", [0.0, 1.0], {"DeRa": ([1.0, 2.0],
                                                                           [0.1, 0.2])},
                               ylabel="reward", title="t", base_beta=0.1)
  out = rep.write_outputs(root, {"pearson": 0.5}, {"curve": fig}, lambda res: "# report\n")
  assert out["report"] == f"{root}/report.md" and out["figure_paths"] == {"curve": fig}
  assert json.loads(bucket.file(f"{root}/results.json").read_text()) == {
      "pearson": 0.5, "figures": {"curve": "curve.png"}}
  assert bucket.file(f"{root}/report.md").read_text() == "# report\n"
  assert bucket.file(f"{root}/curve.png").read_bytes().startswith(b"\x89PNG")
  assert sorted(os.listdir(bucket.file(root))) == ["curve.png", "report.md", "results.json"]
  # the compilation cache stays local
  cache = stages_lib.compilation_cache_dir(root)
  assert not paths.is_remote(cache) and os.path.isabs(cache)
  assert stages_lib.compilation_cache_dir("/x/study") == "/x/study/jax_cache"


def test_layout_free_settings_under_a_uri():
  root = "gs://bucket/study"
  assert stages_lib.layout_free({"a": f"{root}/sft", "b": ["gs://bucket/studyx/sft", "adamw"],
                                 "c": "gs://other/sft", "d": 2}, root) == {
      "a": "<MODEL_DIR>/sft", "b": ["gs://bucket/studyx/sft", "adamw"], "c": "gs://other/sft",
      "d": 2}
  # a local MODEL_DIR keeps its layout-free paths; a URI inside settings stays as it is
  assert stages_lib.layout_free({"a": "/x/study/sft", "u": "gs://bucket/x"}, "/x/study") == {
      "a": "<MODEL_DIR>/sft", "u": "gs://bucket/x"}
