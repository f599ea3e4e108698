"""The benchmarks never reach an accelerator broken: benchmarks/accelerator.sh --smoke
runs every figure at tiny sizes on the CPU (one subprocess), and the bad inputs stop
with one line, exit 2 (the train-step benchmark in-process through its `main(argv)`).

NOTE: the smoke run compiles into the test run's one compilation cache (the script
keeps a JAX_COMPILATION_CACHE_DIR it is given): about 65 CPU-s cold on the 2-core CPU
(four processes, ten tiny programs), 29 with the cache warm.
"""

import importlib.util
import json
import os
import subprocess

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_ROOT, "benchmarks", "accelerator.sh")

# The figures of one smoke run: file suffix -> keys its JSON must hold.
FIGURES = {
    "t5_1_1_large_sft": ("step_s", "tokens_per_s", "compile_s", "memory_per_device_bytes",
                         "compiled_tflops", "model_tflops_per_step", "mfu"),
    "t5_1_1_large_ppo": ("step_s", "tokens_per_s", "compile_s", "memory_per_device_bytes"),
    "decode": ("dera_over_single", "sweep_speedup"),
    "transfer_q": ("forked_speedup",),
    "serving": ("concurrent", "one_at_a_time", "throughput_ratio"),
}


def _script_env():
  env = dict(os.environ)
  # NOTE: the script sets its own XLA flags for --smoke (one CPU device, like one GPU).
  env.pop("XLA_FLAGS", None)
  return env


@pytest.fixture(scope="module")
def train_step():
  spec = importlib.util.spec_from_file_location(
      "train_step", os.path.join(REPO_ROOT, "benchmarks", "train_step.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_accelerator_script_smoke(tmp_path):
  proc = subprocess.run(["bash", SCRIPT, "--smoke", "--out", str(tmp_path)], cwd=REPO_ROOT,
                        env=_script_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  names = sorted(os.listdir(tmp_path))
  assert names == sorted(f"cpu_smoke_{f}.json" for f in FIGURES), names
  for figure, keys in FIGURES.items():
    with open(tmp_path / f"cpu_smoke_{figure}.json") as f:
      row = json.load(f)
    assert row["figure"] == figure and row["command"].startswith("python benchmarks/")
    missing = [k for k in keys if k not in row]
    assert not missing, (figure, missing)
    assert "error" not in row
  with open(tmp_path / "cpu_smoke_t5_1_1_large_sft.json") as f:
    sft = json.load(f)
  # The fused-attention, remat, scanned path was the one measured.
  assert (sft["attention_impl"], sft["remat_policy"], sft["scan_layers"]) == (
      "dot_product", "dots_saveable", True)
  assert sft["step_s"] > 0 and sft["memory_per_device_bytes"] > 0


def test_accelerator_script_without_accelerator_is_one_line():
  proc = subprocess.run(["bash", SCRIPT], cwd=REPO_ROOT, env=_script_env(),
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: no accelerator"), proc.stderr
  assert "--smoke" in lines[0]


def _refused(train_step, capsys, argv):
  assert train_step.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: "), err
  return err[0]


def test_batch_the_mesh_cannot_split(train_step, capsys):
  line = _refused(train_step, capsys, ["--size", "t5_tiny", "--batch", "12"])
  assert "--batch 12 is not divisible by the mesh data axis (8 devices)" in line
  line = _refused(train_step, capsys, ["--algorithm", "ppo", "--size", "t5_tiny",
                                       "--batch", "8"])
  assert "the PPO minibatch (--batch / 2) 4" in line


def test_model_the_mesh_cannot_split(train_step, capsys):
  line = _refused(train_step, capsys, ["--size", "decoder_tiny", "--mesh_data", "1",
                                       "--mesh_model", "8", "--batch", "8"])
  assert "'kv_heads' axis" in line and "model axis (8 devices)" in line


def test_size_beyond_the_device_memory_stops_before_allocating(train_step, capsys):
  # The DeRa decode of a tiny pair holds its two models' params, 10 MB a device.
  line = _refused(train_step, capsys, [
      "--algorithm", "dera", "--size", "t5_tiny", "--dtype", "float32", "--batch", "8",
      "--input_length", "8", "--target_length", "2", "--device_memory_gib", "0.001"])
  assert "the dera step of t5_tiny (batch 8, 8/2 tokens) needs 0.0" in line
  assert "GiB per device, the device has 0.001 GiB" in line
