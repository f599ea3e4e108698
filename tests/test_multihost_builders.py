"""The synthetic-preference builder and the evaluate binary on 2 processes x 2 CPU devices.

Each is run as SLURM starts it (the harness of tests/multiprocess.py: coordinator
on 127.0.0.1) and once on 1 process x 4 devices; the outputs must be the same
rows in the same order, each written once, by process 0 alone. Process 1 is
given its own output paths, in a directory of its own that must stay empty:
a process 1 that wrote anything would leave it there. All six processes run
at once (the builder's on the shared tiny SFT run, the evaluate binary's on
decode files written here).
"""

import json
import math
import os
import random

import pytest

from realign_jax.parallel import multihost
from tests import multiprocess

# NOTE: batches of 4: train's 10 prompts are batches 0 and 2 (6 prompts) on process 0 and
# batch 1 (4) on process 1; test's 3 prompts are one batch, process 1 sits that round out.
NUM_PROMPTS = {"train": 10, "validation": 6, "test": 3}
HERE_ON_1 = {"train": 4, "validation": 2, "test": 0}
# NOTE: 7 rows per group: blocks of 4 and 3 rows; 2 files x 2 lambdas x (reward, ROUGE,
# win rate) = 12 scoring tasks of 7 rows or pairs.
NUM_DOCS, LAMS = 7, (0.0, 1.0)
TIMEOUT_S = 200


def _builder_args(sft_dir, out_dir) -> list:
  return ["-m", "realign_jax.synthetic_preferences",
          "--gin_file=configs/data/synthetic_preferences_tiny.gin",
          f"--gin.POLICY_CHECKPOINT='{sft_dir}'", f"--gin.OUTPUT_DIR='{out_dir}'",
          f"--gin.build_preference_dir.num_prompts={NUM_PROMPTS}",
          "--gin.build_preference_dir.batch_size=4", "--gin.build_preference_dir.input_length=32",
          "--gin.SamplingConfig.max_new_tokens=16"]


def _write_decode_file(path, lams, seed) -> None:
  """A decode file as realign_jax.decode writes it: NUM_DOCS prompts at each lambda."""
  rng = random.Random(seed)
  words = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "home"]
  with open(path, "w") as f:
    for lam in lams:
      for i in range(NUM_DOCS):
        n = rng.randint(3, 16)  # around the default config's 8..12-token window
        f.write(json.dumps({
            "prompt": f"document {i}", "response": " ".join(rng.choices(words, k=n)),
            "lam": lam, "prompt_index": i, "sample": 0, "tokens": [rng.randint(3, 99)] * n,
            "length": n, "kl": rng.random(), "log_ratio": rng.random() - 0.2}) + "\n")


def _evaluate_args(tmp, out) -> list:
  files = [str(tmp / "dera_a.jsonl"), str(tmp / "dera_b.jsonl")]
  return ["-m", "realign_jax.evaluate", "--gin_file=configs/evaluate/default.gin",
          f"--gin.DECODE_FILES={files}", f"--gin.OUTPUT_FILE='{out}'",
          f"--gin.COMPARE_FILE='{tmp / 'sft.jsonl'}'",
          f"--gin.evaluate.reference_file='{tmp / 'refs.jsonl'}'"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_sft_dir):
  """{binary: (1-process run, [process 0, process 1])}, with their output paths in `tmp`."""
  tmp = tmp_path_factory.mktemp("multihost_builders")
  (tmp / "p1").mkdir()  # process 1's outputs would land here
  _write_decode_file(tmp / "dera_a.jsonl", LAMS, seed=1)
  _write_decode_file(tmp / "dera_b.jsonl", LAMS, seed=2)
  _write_decode_file(tmp / "sft.jsonl", (None,), seed=3)
  (tmp / "refs.jsonl").write_text("".join(
      json.dumps({"prompt": f"document {i}", "reference": "the cat sat on the mat"}) + "\n"
      for i in range(NUM_DOCS)))

  jobs = multiprocess.slurm_job_ids(2)

  def start(name, args_of, outputs):
    """The 1-process run (4 devices) and the 2 processes (2 devices each) of one binary."""
    out = {"one": outputs[0], 0: outputs[1], 1: outputs[2]}
    return multiprocess.start_one_and_two(lambda slot: args_of(out[slot]), str(tmp / name),
                                          job_id=jobs.pop())

  builder = start("builder", lambda out: _builder_args(tiny_sft_dir, out),
                  [tmp / "prefs_one", tmp / "prefs_two", tmp / "p1" / "prefs"])
  evaluate = start("evaluate", lambda out: _evaluate_args(tmp, out),
                   [tmp / "eval_one.json", tmp / "eval_two.json", tmp / "p1" / "eval.json"])
  everything = [builder[0], *builder[1], evaluate[0], *evaluate[1]]
  multiprocess.assert_all_succeeded(multiprocess.wait_all(everything, TIMEOUT_S))
  return {"builder": builder, "evaluate": evaluate, "tmp": tmp}


def _lines(path) -> list:
  with open(path) as f:
    return f.read().splitlines()


def test_process_one_writes_nothing(runs):
  assert os.listdir(runs["tmp"] / "p1") == []


def test_builder_rows_match_one_process_and_are_written_once(runs):
  tmp = runs["tmp"]
  one, two = runs["builder"]
  assert sorted(os.listdir(tmp / "prefs_two")) == ["test.jsonl", "train.jsonl",
                                                   "validation.jsonl"]
  for split, n in NUM_PROMPTS.items():
    lines_one, lines_two = _lines(tmp / "prefs_one" / f"{split}.jsonl"), _lines(
        tmp / "prefs_two" / f"{split}.jsonl")
    assert lines_two == lines_one, split
    assert len(set(lines_two)) == len(lines_two)  # no row twice
    # complete: every pair the binary counted is in the file
    counted = [line for line in two[0].stdout.splitlines() if line.startswith(f"{split}: ")
               and " pairs from " in line]
    assert counted == [line for line in one.stdout.splitlines()
                       if line.startswith(f"{split}: ")], (two[0].describe(), one.describe())
    assert counted[0].startswith(f"{split}: {len(lines_two)} pairs from {n} prompts"), counted
    for rank in (0, 1):
      here = n - HERE_ON_1[split] if rank == 0 else HERE_ON_1[split]
      assert f"{split}: process {rank} of 2 sampled {here} of {n} prompts" in two[rank].stdout, (
          two[rank].describe())
  # the pairs are usable preference rows
  for line in _lines(tmp / "prefs_two" / "train.jsonl"):
    row = json.loads(line)
    assert set(row) == {"prompt", "chosen", "rejected"} and row["chosen"] != row["rejected"]


def _assert_close(a, b, where="report"):
  if isinstance(a, dict):
    assert isinstance(b, dict) and list(a) == list(b), where
    for k in a:
      _assert_close(a[k], b[k], f"{where}.{k}")
  elif isinstance(a, list):
    assert isinstance(b, list) and len(a) == len(b), where
    for i, (x, y) in enumerate(zip(a, b)):
      _assert_close(x, y, f"{where}[{i}]")
  elif isinstance(a, float) and isinstance(b, float):
    assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6), (where, a, b)
  else:
    assert a == b, (where, a, b)


def test_evaluate_report_matches_one_process_and_is_written_once(runs):
  tmp = runs["tmp"]
  one, two = runs["evaluate"]
  report_one = json.loads((tmp / "eval_one.json").read_text())
  report_two = json.loads((tmp / "eval_two.json").read_text())
  _assert_close(report_two, report_one)
  # complete: every group of both files, every win rate, each once
  for name in ("dera_a", "dera_b"):
    groups = report_two["files"][str(tmp / f"{name}.jsonl")]
    assert [g["lam"] for g in groups] == list(LAMS)
    for g in groups:
      assert g["num_rows"] == NUM_DOCS and g["reward"] is not None and g["rouge"]["rouge1"] > 0
  assert [(w["file"], w["lam"]) for w in report_two["win_rates"]] == [
      (str(tmp / f"{name}.jsonl"), lam) for name in ("dera_a", "dera_b") for lam in LAMS]
  assert all(w["num_pairs"] == NUM_DOCS for w in report_two["win_rates"])
  # the printed lines are computed from the same report on every process
  assert _printed(two[0]) == _printed(two[1]) == _printed(one)
  total = 12 * NUM_DOCS
  for rank, here in ((0, 12 * 4), (1, 12 * 3)):
    assert f"process {rank} of 2 scored {here} of {total} rows and pairs" in two[rank].stdout, (
        two[rank].describe())
  assert (tmp / "eval_two.json.config.gin").read_text().strip()


def _printed(run) -> list:
  """The report's printed lines, without the per-process and output-path ones."""
  return [line for line in run.stdout.splitlines()
          if not line.startswith(("process ", "wrote ", "[Gloo]"))]


# ---- the evaluate binary's split, in one process -----------------------------------------
class _Sent(Exception):
  """Stops a simulated process at its gather: what it sent is all the test needs."""


def _as_process(monkeypatch, rank, others=None):
  """`evaluate._score_split` as process `rank` of 2, `others` the other process's payload.

  Without `others` the gather raises `_Sent`; `sent` holds what the process sent.
  """
  from realign_jax import evaluate as evaluate_bin
  sent = []

  def gather_objects(obj):
    sent.append(obj)
    if others is None:
      raise _Sent()
    return [obj, others] if rank == 0 else [others, obj]
  monkeypatch.setattr(multihost, "process_slot", lambda: (2, rank))
  monkeypatch.setattr(multihost, "gather_objects", gather_objects)
  return evaluate_bin._score_split, sent


def test_score_split_blocks_match_one_process_and_errors_reach_every_process(monkeypatch):
  from realign_jax.plumbing.errors import UserError
  items = list(range(7))
  tasks = {"squares": (7, lambda part: [x * x for x in items[part]]),
           "none": (0, lambda part: pytest.fail("an empty task is not scored")),
           "one": (1, lambda part: [float(items[part][0]) + 0.5])}
  split, sent = _as_process(monkeypatch, 1)
  with pytest.raises(_Sent):
    split(tasks)
  payload_1 = sent[0]
  assert payload_1 == {"error": None, "results": [[16, 25, 36], [], []]}
  split, _ = _as_process(monkeypatch, 0, payload_1)
  scored, here = split(tasks)
  assert scored == {"squares": [x * x for x in items], "none": [], "one": [0.5]}
  assert here == 4 + 0 + 1

  def fails_on_block_1(part):
    if part.start > 0:
      raise UserError("judge x: HTTP 401 Unauthorized")
    return [0.0] * (part.stop - part.start)
  bad = {"win": (7, fails_on_block_1)}
  split, sent = _as_process(monkeypatch, 1, {"error": None, "results": [[0.0] * 4]})
  with pytest.raises(UserError, match="HTTP 401"):
    split(bad)  # NOTE: raised on the failing process after its error went out
  assert sent[0] == {"error": "judge x: HTTP 401 Unauthorized", "results": None}
  split, _ = _as_process(monkeypatch, 0, sent[0])
  with pytest.raises(UserError, match=r"^process 1 failed while scoring: judge x: HTTP 401 "
                                      r"Unauthorized$"):
    split(bad)


def test_a_refusal_on_one_process_is_a_one_line_error_on_every_process(monkeypatch, tmp_path):
  # Process 1 cannot read a decode file that process 0 can (written on host 0 only): both
  # processes end with one line instead of process 0 waiting in the scoring gather.
  from realign_jax import evaluate as evaluate_bin
  from realign_jax.plumbing.errors import UserError
  row = {"prompt": "p", "response": "r", "lam": 1.0, "kl": 0.1, "log_ratio": 0.1, "seed": 0}
  (tmp_path / "d.jsonl").write_text(json.dumps(row) + "\n")
  out = str(tmp_path / "eval.json")
  _, sent = _as_process(monkeypatch, 1)
  with pytest.raises(_Sent):  # NOTE: it tells the others before raising its own error
    evaluate_bin.evaluate(decode_files=[str(tmp_path / "no_such.jsonl")], output_file=out)
  assert len(sent) == 1 and "no_such.jsonl" in sent[0]
  monkeypatch.setattr(multihost, "gather_objects", lambda obj: [None, obj])
  with pytest.raises(UserError, match="no_such.jsonl"):
    evaluate_bin.evaluate(decode_files=[str(tmp_path / "no_such.jsonl")], output_file=out)
  scoring = []
  monkeypatch.setattr(evaluate_bin, "_score_split", lambda tasks: scoring.append(tasks))
  _as_process(monkeypatch, 0, sent[0])
  with pytest.raises(UserError, match=r"^process 1 refused the run: .*no_such.jsonl"):
    evaluate_bin.evaluate(decode_files=[str(tmp_path / "d.jsonl")], output_file=out)
  assert scoring == [] and not os.path.exists(out)
