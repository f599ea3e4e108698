"""The sweep binary: runs, resume, failures, aggregation, bad input, the SLURM path.

Most runs use a fake binary (a module the tests write, on PYTHONPATH): it
appends each start to a log (to count the runs started) and writes a trainer-
style metrics.jsonl. One test sweeps the real evaluate binary.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from realign_jax import sweep as sweep_bin
from realign_jax.plumbing.errors import UserError
from realign_jax.sweeps import aggregate as aggregate_lib
from realign_jax.sweeps import executors
from realign_jax.sweeps import runner

FAKE_BINARY = '''
import json, os, sys, time
import gin
from realign_jax.plumbing import gin_utils

def sweepfake(*, model_dir, alpha, beta, seed, start_log, sleep_s=0.0, fail_alpha=None):
  with open(start_log, "a") as f:
    f.write(os.path.basename(model_dir) + "\\n")
  if alpha == fail_alpha and seed == 1:
    print("a traceback line", file=sys.stderr)
    print(f"RuntimeError: alpha {alpha} diverged", file=sys.stderr)
    sys.exit(1)
  time.sleep(sleep_s)
  os.makedirs(model_dir, exist_ok=True)
  rows = [{"step": 1, "split": "train", "loss": 100.0},
          {"step": 2, "split": "train", "loss": alpha * beta + seed ** 2 / 7},
          {"step": 2, "split": "eval", "reward": alpha - 0.3 * seed * beta}]
  with open(os.path.join(model_dir, "metrics.jsonl"), "w") as f:
    f.write("".join(json.dumps(r) + "\\n" for r in rows))

if __name__ == "__main__":
  files, bindings, rest = gin_utils.split_args(sys.argv[1:])
  gin.external_configurable(sweepfake, "sweepfake")
  gin.parse_config_files_and_bindings(files, bindings)
  gin.get_configurable("sweepfake")()
'''

FAKE_GIN = '''
MODEL_DIR = %gin.REQUIRED
ALPHA = 1.0
BETA = 1.0
SEED = 0
SLEEP = 0.0
FAIL_ALPHA = None
sweepfake.model_dir = %MODEL_DIR
sweepfake.alpha = %ALPHA
sweepfake.beta = %BETA
sweepfake.seed = %SEED
sweepfake.sleep_s = %SLEEP
sweepfake.fail_alpha = %FAIL_ALPHA
sweepfake.start_log = %START_LOG
START_LOG = 'starts.log'
'''


@pytest.fixture
def fake(tmp_path, monkeypatch):
  """A fake binary module on PYTHONPATH, its base config and a sweep file writer."""
  (tmp_path / "sweepfake.py").write_text(FAKE_BINARY)
  (tmp_path / "fake.gin").write_text(FAKE_GIN)
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.setenv("PYTHONPATH",
                     os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
  monkeypatch.chdir(tmp_path)

  def write(name="s.gin", parallel=2, **over):
    settings = {
        "binary": "'sweepfake'", "gin_files": "['fake.gin']", "root": "'root'",
        "run_dir_binding": "'MODEL_DIR'",
        "fixed": f"{{'START_LOG': '{tmp_path / 'starts.log'}'}}",
        "grid": "{'ALPHA': [1.0, 2.0], 'BETA': [0.5, 3.0]}", "seeds": "[0, 1]",
        "seed_binding": "'SEED'", "executor": "@LocalExecutor()", "max_retries": "1"}
    settings.update(over)
    text = "".join(f"sweep.{k} = {v}\n" for k, v in settings.items() if v is not None)
    text += f"LocalExecutor.parallel = {parallel}\n"
    (tmp_path / name).write_text(text)
    return str(tmp_path / name)
  return write, tmp_path


def _starts(tmp_path):
  p = tmp_path / "starts.log"
  return p.read_text().split() if p.exists() else []


def test_sweep_end_to_end_failure_retry_and_aggregate(fake, capsys):
  write, tmp = fake
  # ALPHA=2.0 fails at seed 1 (both BETA): retried once each, the other 6 runs finish.
  f = write(fixed=f"{{'START_LOG': '{tmp / 'starts.log'}', 'FAIL_ALPHA': 2.0}}",
            plot_metric="'eval/reward'", plot_x="'ALPHA'")
  code = sweep_bin.main([f"--gin_file={f}"])
  out = capsys.readouterr().out
  assert code == 1
  names = sorted(os.listdir(tmp / "root"))
  assert "ALPHA=1.0,BETA=0.5,SEED=0" in names and "ALPHA=2.0,BETA=3.0,SEED=1" in names
  starts = _starts(tmp)
  failing = ["ALPHA=2.0,BETA=0.5,SEED=1", "ALPHA=2.0,BETA=3.0,SEED=1"]
  assert len(starts) == 6 + 2 * 2 and all(starts.count(n) == 2 for n in failing)
  for n in failing:
    assert f"failed: {n} (exit 1, 2 attempt(s)): RuntimeError: alpha 2.0 diverged" in out
  assert "summary: 0 skipped (finished before), 6 done now, 2 failed" in out
  recorded = json.loads((tmp / "root" / "ALPHA=1.0,BETA=3.0,SEED=1" /
                         runner.BINDINGS_FILE).read_text())["bindings"]
  assert recorded["ALPHA"] == 1.0 and recorded["BETA"] == 3.0 and recorded["SEED"] == 1
  assert recorded["MODEL_DIR"] == str(tmp / "root" / "ALPHA=1.0,BETA=3.0,SEED=1")

  # The aggregate, recomputed from the runs' own metrics files (their last rows).
  doc = json.loads((tmp / "root" / "aggregate.json").read_text())
  assert sorted(doc["missing_runs"]) == failing
  assert len(doc["settings"]) == 4
  for s in doc["settings"]:
    b = s["bindings"]
    finals = []
    for seed in (0, 1):
      p = tmp / "root" / f"ALPHA={b['ALPHA']},BETA={b['BETA']},SEED={seed}" / "metrics.jsonl"
      if runner.is_done(str(p.parent)):
        rows = [json.loads(l) for l in p.read_text().splitlines()]
        finals.append(([r for r in rows if r["split"] == "train"][-1]["loss"],
                       [r for r in rows if r["split"] == "eval"][-1]["reward"]))
    for i, m in enumerate(("train/loss", "eval/reward")):
      vals = np.array([x[i] for x in finals])
      st = s["metrics"][m]
      assert st["n"] == len(vals)
      assert st["mean"] == pytest.approx(vals.mean(), rel=1e-12)
      if len(vals) > 1:
        assert st["se"] == pytest.approx(vals.std(ddof=1) / np.sqrt(len(vals)), rel=1e-12)
        assert st["se"] > 0
      else:
        assert st["se"] is None  # one seed: no standard error (null, not 0)
  csv_lines = (tmp / "root" / "aggregate.csv").read_text().splitlines()
  assert csv_lines[0] == "ALPHA,BETA,metric,mean,se,n"
  assert len(csv_lines) == 1 + 4 * 2
  assert (tmp / "root" / "eval_reward_vs_ALPHA.png").stat().st_size > 1000

  # A rerun starts only the two failed runs (each twice again); --aggregate starts nothing.
  code = sweep_bin.main([f"--gin_file={f}"])
  assert code == 1 and len(_starts(tmp)) == 10 + 4
  assert sweep_bin.main([f"--gin_file={f}", "--aggregate"]) == 0
  assert len(_starts(tmp)) == 14


def test_interrupted_sweep_reruns_only_what_is_missing(fake):
  write, tmp = fake
  f = write(fixed=f"{{'START_LOG': '{tmp / 'starts.log'}', 'SLEEP': 0.3}}", parallel=1)
  cmd = [sys.executable, "-m", "realign_jax.sweep", f"--gin_file={f}"]
  proc = subprocess.Popen(cmd, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 120
  while time.monotonic() < deadline:
    done = [d for d in (tmp / "root").glob("*") if runner.is_done(str(d))]
    if len(done) >= 3:
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == 130, err
  finished = {d.name for d in (tmp / "root").glob("*") if runner.is_done(str(d))}
  assert 3 <= len(finished) < 8
  first = _starts(tmp)
  # The run cut short (started, no status) is started again, into the same directory.
  cut = [n for n in first if n not in finished]
  rerun = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=120)
  assert rerun.returncode == 0, rerun.stderr
  second = _starts(tmp)[len(first):]
  assert sorted(second) == sorted(set(n for n in _all_names() if n not in finished))
  assert set(cut) <= set(second)
  assert f"{len(finished)} skipped (finished before), {8 - len(finished)} done now" in rerun.stdout


def _all_names():
  return [f"ALPHA={a},BETA={b},SEED={s}" for a in (1.0, 2.0) for b in (0.5, 3.0) for s in (0, 1)]


def test_dry_run_lists_runs_and_starts_nothing(fake, capsys):
  write, tmp = fake
  f = write(grid="{'ALPHA': [1.0, 2.0]}", zip="{'BETA': [0.5, 3.0], 'SLEEP': [0.0, 0.1]}")
  assert sweep_bin.main([f"--gin_file={f}", "--dry_run"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 2 * 2 * 2
  assert lines[0].startswith("ALPHA=1.0,BETA=0.5,SLEEP=0.0,SEED=0\tto run\t")
  assert "--gin.BETA=3.0" in lines[-1] and "--gin.SLEEP=0.1" in lines[-1]
  assert not (tmp / "root").exists() and not _starts(tmp)


def test_shipped_sweep_dry_run(repo_root):
  res = subprocess.run([sys.executable, "-m", "realign_jax.sweep",
                        "--gin_file=configs/sweeps/ppo_beta_tiny.gin", "--dry_run",
                        "--gin.sweep.root='/nonexistent/sweep_root'"],
                       cwd=repo_root, capture_output=True, text=True, timeout=120)
  assert res.returncode == 0, res.stderr
  lines = res.stdout.splitlines()
  assert len(lines) == 5 * 2 and lines[0].startswith("BETA=0.01,SEED=0\tto run\t")
  assert not os.path.exists("/nonexistent/sweep_root")
  h = subprocess.run([sys.executable, "-m", "realign_jax.sweep", "--help"], cwd=repo_root,
                     capture_output=True, text=True, timeout=60)
  assert h.returncode == 0 and "--dry_run" in h.stdout


@pytest.mark.parametrize("name,runs", [("ppo_beta_tiny", 10), ("length_reward_seeds", 3),
                                       ("dera_beta_decoder_tiny", 6)])
def test_every_shipped_sweep_checks_and_lists_its_runs(name, runs, repo_root, tmp_path, capsys,
                                                       monkeypatch):
  monkeypatch.chdir(repo_root)
  assert sweep_bin.main([f"--gin_file=configs/sweeps/{name}.gin", "--dry_run",
                         f"--gin.sweep.root='{tmp_path / 'root'}'"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == runs and all("\tto run\t" in l for l in lines)
  assert not (tmp_path / "root").exists()


@pytest.mark.parametrize("over,message", [
    (dict(grid="{'ALPHAX': [1.0, 2.0]}"), "binding ALPHAX is not a macro of the base config"),
    (dict(fixed="{'sweepfake.gamma': 1}"), "binding sweepfake.gamma"),
    (dict(grid="{'ALPHA': []}"), "sweep.grid['ALPHA'] is empty"),
    (dict(grid=None, seeds=None, seed_binding=None), "the sweep has no runs"),
    (dict(grid=None, zip="{'ALPHA': [1.0, 2.0], 'BETA': [1.0]}"),
     "sweep.zip lists have different lengths: ALPHA has 2, BETA has 1"),
    (dict(grid="{'FAIL_ALPHA': ['a/b', 'a_b']}"), "two runs map to the run directory"),
    (dict(root="'afile'"), "sweep.root afile exists and is not a directory"),
    (dict(fixed="{'ALPHA': 1.0}"), "binding ALPHA is set twice"),
])
def test_bad_input_is_refused_before_anything_starts(fake, over, message):
  write, tmp = fake
  (tmp / "afile").write_text("x")
  f = write(**over)
  with pytest.raises(UserError) as e:
    sweep_bin.main([f"--gin_file={f}"])
  assert message in str(e.value) and "\n" not in str(e.value)
  assert not _starts(tmp) and not (tmp / "root").exists()


def test_bad_input_from_the_command_line_is_one_line_exit_2(fake):
  write, tmp = fake
  f = write(grid="{'ALPHAX': [1.0, 2.0]}")
  res = subprocess.run([sys.executable, "-m", "realign_jax.sweep", f"--gin_file={f}"], cwd=tmp,
                       capture_output=True, text=True, timeout=120)
  assert res.returncode == 2, res.stderr
  assert res.stderr.startswith("error: binding ALPHAX is not a macro") and \
      res.stderr.count("\n") == 1, res.stderr
  assert not _starts(tmp) and not (tmp / "root").exists()


def test_changed_fixed_binding_is_refused(fake, capsys):
  write, tmp = fake
  f = write(grid="{'ALPHA': [1.0]}", seeds="[0]")
  assert sweep_bin.main([f"--gin_file={f}"]) == 0
  f = write(grid="{'ALPHA': [1.0]}", seeds="[0]",
            fixed=f"{{'START_LOG': '{tmp / 'starts.log'}', 'BETA': 2.0}}")
  with pytest.raises(UserError, match="was made with other bindings .BETA differ"):
    sweep_bin.main([f"--gin_file={f}"])
  capsys.readouterr()


def test_real_binary_evaluate_sweep(tmp_path, repo_root, capsys, monkeypatch):
  """realign_jax.evaluate over a reward-window grid: the runs' summaries, aggregated."""
  rng = np.random.default_rng(0)
  words = "the cat sat on a mat and then ran away quickly from dog".split()
  decode = tmp_path / "dera.jsonl"
  with open(decode, "w") as fh:
    for i in range(6):
      for lam in (0.0, 1.0):
        resp = " ".join(rng.choice(words, int(rng.integers(1, 9))))
        fh.write(json.dumps({"prompt": f"document {i}", "response": resp, "lam": lam,
                             "prompt_index": i, "sample": 0, "kl": float(rng.random()),
                             "log_ratio": float(rng.normal()), "length": len(resp.split()) + 1})
                 + "\n")
  f = tmp_path / "eval_sweep.gin"
  f.write_text(f"""
sweep.binary = 'realign_jax.evaluate'
sweep.gin_files = ['configs/evaluate/default.gin']
sweep.root = '{tmp_path / "root"}'
sweep.run_dir_binding = 'OUTPUT_FILE'
sweep.run_path = 'eval.json'
sweep.fixed = {{'DECODE_FILES': ['{decode}'], 'L_MIN': 1}}
sweep.grid = {{'L_MAX': [1, 60]}}
sweep.seeds = [0]
sweep.seed_binding = 'evaluate.seed'
sweep.executor = @LocalExecutor()
LocalExecutor.parallel = 2
""")
  monkeypatch.chdir(repo_root)
  assert sweep_bin.main([f"--gin_file={f}"]) == 0, capsys.readouterr()
  doc = json.loads((tmp_path / "root" / "aggregate.json").read_text())
  for s in doc["settings"]:
    run = tmp_path / "root" / f"L_MAX={s['bindings']['L_MAX']},evaluate.seed=0"
    summary = json.loads((run / "eval.json").read_text())
    groups = summary["files"][str(decode)]
    for g in groups:
      st = s["metrics"][f"files/{decode}[lam={g['lam']}]/reward"]
      assert st == {"mean": g["reward"], "se": None, "n": 1}
  # Every response fits the window [1, 60] (reward 0); few fit [1, 1].
  r = [s["metrics"][f"files/{decode}[lam=1.0]/reward"]["mean"] for s in doc["settings"]]
  assert r[0] < -0.5 and r[1] == 0.0


def test_slurm_job_array_script_and_local_array(tmp_path, monkeypatch):
  path = os.environ["PATH"]
  monkeypatch.setenv("PATH", str(tmp_path))  # no srun here
  with pytest.raises(UserError, match="no `srun`"):
    executors.SlurmExecutor(partition="gpu").check()
  # NOTE: submitit's SLURM executor looks for `srun` on PATH; a stand-in lets it write the
  # job script without a cluster (nothing is submitted).
  (tmp_path / "bin").mkdir()
  (tmp_path / "bin" / "srun").write_text("#!/bin/sh\nexit 1\n")
  (tmp_path / "bin" / "srun").chmod(0o755)
  monkeypatch.setenv("PATH", str(tmp_path / "bin") + os.pathsep + path)
  ex = executors.SlurmExecutor(partition="gpu", account="proj", gpus_per_node=2, cpus_per_task=8,
                               time_min=90, array_parallelism=4)
  text = ex.make(str(tmp_path / "slurm"))._executor._make_submission_file_text("CMD", "uid")
  for line in ("#SBATCH --partition=gpu", "#SBATCH --account=proj", "#SBATCH --gpus-per-node=2",
               "#SBATCH --cpus-per-task=8", "#SBATCH --time=90"):
    assert line in text, text
  # The same map_array path, run by submitit's debug executor (in this process).
  jobs = [runner.RunJob(name=f"r{i}", run_dir=str(tmp_path / f"r{i}"),
                        command=(sys.executable, "-c", f"import sys; sys.exit({i})"),
                        cwd=str(tmp_path), max_retries=0, bindings={"I": i}) for i in range(2)]
  seen = []
  res = executors.SlurmExecutor(cluster="debug", time_min=5).run(jobs, seen.append, str(tmp_path))
  assert [r.status for r in res] == ["done", "failed"] and len(seen) == 2
  assert runner.is_done(str(tmp_path / "r0")) and not runner.is_done(str(tmp_path / "r1"))


def test_mean_se_one_value_has_no_standard_error():
  mean, se, n = aggregate_lib.mean_se([2.5])
  assert mean == 2.5 and math.isnan(se) and n == 1


def test_study_and_decode_outputs_are_read_per_lambda(tmp_path):
  # A study's results.json: lists over the lambda grid, labelled by `list_axis`.
  res = {"lambdas": [0.0, 0.5], "dera_reward": [-1.0, -0.25], "pearson": None,
         "dera_verdict": {"verdict": "x"}, "stage_seconds": {"sft": 3.0}}
  (tmp_path / "results.json").write_text(json.dumps(res))
  flat = aggregate_lib.read_metrics(str(tmp_path / "results.json"), "lambdas")
  assert flat["dera_reward[lambdas=0.0]"] == -1.0 and flat["dera_reward[lambdas=0.5]"] == -0.25
  assert flat["stage_seconds/sft"] == 3.0 and "pearson" not in flat
  # Decode rows (one per prompt, sample and lambda): the mean of each field per lambda.
  rng = np.random.default_rng(1)
  rows = [{"prompt": f"p{i}", "response": "r", "lam": lam, "seed": 0, "kl": float(rng.random()),
           "length": int(rng.integers(1, 9))} for i in range(5) for lam in (0.0, 2.0)]
  (tmp_path / "dera.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  flat = aggregate_lib.read_metrics(str(tmp_path / "dera.jsonl"))
  for lam in (0.0, 2.0):
    sel = [r for r in rows if r["lam"] == lam]
    assert flat[f"kl[lam={lam}]"] == pytest.approx(np.mean([r["kl"] for r in sel]))
    assert flat[f"length[lam={lam}]"] == pytest.approx(np.mean([r["length"] for r in sel]))
  assert not any(k.startswith(("seed", "lam[")) for k in flat)


def test_verdicts_across_seeds_and_the_markdown_table(tmp_path):
  # Three seeds of a study: per-lambda columns, a scalar, and a verdict that holds in two
  # runs of one setting only.
  from realign_jax.sweeps import plan as plan_lib
  spec = plan_lib.Sweep(binary="realign_jax.experiments.length_reward",
                        gin_files=["configs/experiments/length_reward_tiny.gin"],
                        root=str(tmp_path / "root"), run_dir_binding="MODEL_DIR",
                        seeds=[0, 1, 2], seed_binding="SEED", list_axis="lambdas",
                        agree=["dera_verdict/verdict", "retrained_verdict/verdict"],
                        report_metrics=["dera_reward", "pearson"])
  runs = plan_lib.expand(spec, cwd=str(tmp_path))
  rewards = [[-1.0, -0.5], [-1.0, -0.3], [-1.0, -0.4]]
  verdicts = ["over-regularised", "over-regularised", "about right"]
  for run, rew, v in zip(runs, rewards, verdicts):
    os.makedirs(run.run_dir)
    res = {"lambdas": [0.0, 1.0], "dera_reward": rew, "pearson": 0.5 + rew[1],
           "dera_verdict": {"verdict": "over-regularised"}, "retrained_verdict": {"verdict": v}}
    (tmp_path / run.run_dir / "results.json").write_text(json.dumps(res))
    (tmp_path / run.run_dir / runner.STATUS_FILE).write_text(json.dumps({"status": "done"}))
  doc = aggregate_lib.aggregate(spec, runs)
  (setting,) = doc["settings"]
  agree = setting["agreement"]
  assert agree["dera_verdict/verdict"] == {"values": ["over-regularised"] * 3, "holds": True,
                                           "value": "over-regularised"}
  assert agree["retrained_verdict/verdict"]["holds"] is False
  assert agree["retrained_verdict/verdict"]["value"] is None
  md = open(doc["paths"]["md"]).read()
  # -0.4 +- sd 0.1 / sqrt(3) over the three seeds at lambda = 1
  assert "| 1.0 | -0.400 ± 0.058 (3) |" in md
  assert "| 0.0 | -1.000 ± 0.000 (3) |" in md
  assert "- pearson: 0.100 ± 0.058 (3)" in md
  assert "dera_verdict/verdict: **over-regularised** in every run" in md
  assert "retrained_verdict/verdict: differs across runs" in md
  bad = plan_lib.Sweep(**{**spec.__dict__, "report_metrics": ["dera_rewrd"]})
  before = {p: os.path.getmtime(doc["paths"][p]) for p in ("json", "csv", "md")}
  with pytest.raises(UserError, match="dera_rewrd"):
    aggregate_lib.aggregate(bad, runs)
  # nothing was rewritten: the files of the last good aggregation stay together
  assert {p: os.path.getmtime(doc["paths"][p]) for p in before} == before
  with pytest.raises(UserError, match="no run's results.json"):
    aggregate_lib.aggregate(plan_lib.Sweep(**{**spec.__dict__, "agree": ["dera_verdict/verdic"]}),
                            runs)
  with pytest.raises(UserError, match="sweep.agree = 'dera_verdict/verdict': give a list"):
    plan_lib.expand(plan_lib.Sweep(**{**spec.__dict__, "agree": "dera_verdict/verdict"}),
                    cwd=str(tmp_path))


def test_markdown_rows_follow_the_numbers():
  from realign_jax.sweeps import plan as plan_lib
  spec = plan_lib.Sweep(binary="b", gin_files=["g"], root="r", run_dir_binding="D",
                        seeds=[0], list_axis="lambdas", report_metrics=["x"])
  one = {"mean": 1.0, "se": None, "n": 1}
  names = [f"x[lambdas={v}]" for v in ("0.5", "1.0", "10.0", "2.0")]
  md = aggregate_lib.markdown(spec, [{"bindings": {}, "runs": ["a"], "metrics":
                                      {n: one for n in names}}], sorted(names))
  rows = [line.split(" | ")[0].strip("| ") for line in md.splitlines()
          if line.startswith("| ") and "lambdas" not in line]
  assert rows == ["0.5", "1.0", "2.0", "10.0"]
