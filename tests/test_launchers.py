"""The launchers under scripts/: what `--dry_run` prints is what a shell (and the remote shell) runs."""

import os
import re
import shlex
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARY = ["realign_jax.train", "--gin_file=configs/sft/builtin_tiny.gin",
          "--gin.MODEL_DIR='gs://bucket/runs/sft'", "--gin.TRAIN_STEPS=10"]
EXPECTED = ["-m", *BINARY]


def _launch(script, *args, cwd=REPO_ROOT):
  return subprocess.run([sys.executable, os.path.join(REPO_ROOT, "scripts", script), *args],
                        cwd=cwd, capture_output=True, text=True, timeout=60)


def test_tpu_pod_one_slice():
  out = _launch("launch_tpu_pod.py", "--tpu", "pod-v4-32", "--zone", "us-central2-b",
                "--project", "p1", "--workdir", "~/realign_jax", "--dry_run", "--", *BINARY)
  assert out.returncode == 0, out.stderr
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 1
  local = shlex.split(lines[0])
  assert local[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod-v4-32"]
  assert local[6:10] == ["--zone", "us-central2-b", "--project", "p1"]
  assert "--worker=all" in local
  remote = [a for a in local if a.startswith("--command=")][0][len("--command="):]
  cd, _, command = remote.partition(" && ")
  assert cd == "cd ~/realign_jax"
  assert shlex.split(command) == ["python3", *EXPECTED]


def test_tpu_multislice_sets_megascale_per_slice():
  out = _launch("launch_tpu_pod.py", "--tpu", "ms", "--zone", "z", "--num_slices", "3",
                "--dry_run", "--", *BINARY)
  assert out.returncode == 0, out.stderr
  text = out.stdout
  describe = re.search(r"COORDINATOR=\$\((.*)\)", text).group(1)
  assert shlex.split(describe)[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "ms-0"]
  ssh = [line for line in text.splitlines() if " ssh " in line]
  assert len(ssh) == 3
  for i, line in enumerate(ssh):
    assert line.endswith(" &")
    # NOTE: what the local shell passes on, with $COORDINATOR as the shell fills it in.
    local = shlex.split(line[:-2].replace("$COORDINATOR", "10.0.0.7"))
    assert local[5] == f"ms-{i}" and "--worker=all" in local
    remote = shlex.split([a for a in local if a.startswith("--command=")][0][len("--command="):])
    assert remote[:3] == ["MEGASCALE_COORDINATOR_ADDRESS=10.0.0.7:8080",
                          "MEGASCALE_NUM_SLICES=3", f"MEGASCALE_SLICE_ID={i}"]
    assert remote[3:] == ["python3", *EXPECTED]
  assert "wait" in text and text.strip().endswith("exit $status")


def test_slurm_dry_run_prints_the_script_and_writes_nothing(tmp_path):
  target = tmp_path / "job.sbatch"
  out = _launch("launch_slurm.py", "--nodes", "4", "--gpus_per_node", "8", "--time", "02:00:00",
                "--partition", "gpu", "--script", str(target), "--venv", "/opt/venv",
                "--dry_run", "--", *BINARY)
  assert out.returncode == 0, out.stderr
  text = out.stdout
  for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
               "#SBATCH --time=02:00:00", "#SBATCH --partition=gpu",
               "source /opt/venv/bin/activate"):
    assert line in text.splitlines(), line
  srun = [line for line in text.splitlines() if line.startswith("srun ")]
  assert len(srun) == 1
  words = shlex.split(srun[0])
  assert "--ntasks-per-node=1" in words
  assert words[words.index("python"):] == ["python", *EXPECTED]
  assert text.strip().splitlines()[-1] == f"sbatch {target}"
  assert not target.exists()


def test_slurm_writes_the_script_it_submits(tmp_path):
  # NOTE: a stand-in `sbatch` on PATH records what it was asked to submit.
  bindir = tmp_path / "bin"
  bindir.mkdir()
  (bindir / "sbatch").write_text(f"#!/bin/sh\ncp \"$1\" {tmp_path}/submitted\n")
  (bindir / "sbatch").chmod(0o755)
  target = tmp_path / "jobs" / "job.sbatch"
  env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}")
  out = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "scripts", "launch_slurm.py"),
                        "--nodes", "2", "--gpus_per_node", "4", "--time", "1:00:00",
                        "--script", str(target), "--log_dir", str(tmp_path / "logs"), "--",
                        *BINARY], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=60)
  assert out.returncode == 0, out.stderr
  assert (tmp_path / "submitted").read_text() == target.read_text()
  dry = _launch("launch_slurm.py", "--nodes", "2", "--gpus_per_node", "4", "--time", "1:00:00",
                "--script", str(target), "--log_dir", str(tmp_path / "logs"), "--dry_run", "--",
                *BINARY)
  assert target.read_text() in dry.stdout


def test_gpu_host_processes_split_the_gpus():
  out = _launch("launch_gpu_host.py", "--num_processes", "2", "--gpus", "8", "--port", "4321",
                "--dry_run", "--", *BINARY)
  assert out.returncode == 0, out.stderr
  starts = [shlex.split(line[:-2]) for line in out.stdout.splitlines() if line.endswith(" &")]
  assert len(starts) == 2
  for i, words in enumerate(starts):
    assert words[:4] == [f"CUDA_VISIBLE_DEVICES={','.join(str(g) for g in range(4 * i, 4 * i + 4))}",
                         "JAX_COORDINATOR_ADDRESS=127.0.0.1:4321", "JAX_NUM_PROCESSES=2",
                         f"JAX_PROCESS_ID={i}"]
    assert words[4:] == ["python", *EXPECTED]
  one = _launch("launch_gpu_host.py", "--dry_run", "--", *BINARY)
  assert shlex.split(one.stdout) == ["python", *EXPECTED]


@pytest.mark.parametrize("script,args,needle", [
    ("launch_tpu_pod.py", ["--zone", "z"], "--tpu"),
    ("launch_tpu_pod.py", ["--tpu", "t"], "--zone"),
    ("launch_slurm.py", ["--gpus_per_node", "8", "--time", "1:00:00", "--script", "j"], "--nodes"),
    ("launch_gpu_host.py", ["--num_processes", "2"], "--gpus"),
    ("launch_gpu_host.py", ["--num_processes", "3", "--gpus", "8"], "--gpus=8"),
])
def test_missing_or_bad_flag_is_one_line(script, args, needle):
  out = _launch(script, *args, "--dry_run", "--", *BINARY)
  assert out.returncode == 2
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0]
  assert out.stdout == ""


def test_binary_must_be_named_with_its_config():
  out = _launch("launch_gpu_host.py", "--dry_run")
  assert out.returncode == 2 and "no binary given" in out.stderr
  out = _launch("launch_gpu_host.py", "--dry_run", "--", "realign_jax.train")
  assert out.returncode == 2 and "--gin_file" in out.stderr
  out = _launch("launch_gpu_host.py", "--dry_run", "--", "realign_jax.trian", "--gin_file=x")
  assert out.returncode == 2 and "'realign_jax.trian' is not one of the binaries" in out.stderr
