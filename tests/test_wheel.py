"""The wheel: built from a copy of the sources, installed apart, run from another directory.

The configs/ and gin/ shipped inside the wheel must be what the binaries find
(`--gin_file=configs/...` and the configs' `include 'gin/...'`), not the
checkout the test runs from.
"""

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("realign_jax", "configs", "gin", "setup.py", "pyproject.toml", "README.md")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("wheel")
  src = tmp / "src"
  src.mkdir()
  ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
  for name in SOURCES:
    path = os.path.join(REPO_ROOT, name)
    if os.path.isdir(path):
      shutil.copytree(path, src / name, ignore=ignore)
    else:
      shutil.copy(path, src / name)
  dist = tmp / "dist"
  build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                          "--no-build-isolation", "-w", str(dist), "."], cwd=src,
                         capture_output=True, text=True, timeout=300)
  assert build.returncode == 0, build.stdout + build.stderr
  (wheel,) = dist.glob("realign_jax-*.whl")
  target = tmp / "site"
  inst = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index",
                         "--target", str(target), str(wheel)],
                        capture_output=True, text=True, timeout=300)
  assert inst.returncode == 0, inst.stdout + inst.stderr
  elsewhere = tmp / "elsewhere"
  elsewhere.mkdir()
  env = dict(os.environ, PYTHONPATH=str(target), JAX_PLATFORMS="cpu")
  return wheel, target, elsewhere, env


def test_wheel_ships_every_config(installed):
  wheel = installed[0]
  names = set(zipfile.ZipFile(wheel).namelist())
  for top in ("configs", "gin"):
    for root, _, files in os.walk(os.path.join(REPO_ROOT, top)):
      for f in files:
        if f.endswith(".gin"):
          rel = os.path.relpath(os.path.join(root, f), REPO_ROOT).replace(os.sep, "/")
          assert f"realign_jax/{rel}" in names, rel
  assert "realign_jax/data/builtin/vocab.model" in names


def test_installed_binary_finds_its_configs_from_another_directory(installed):
  _, target, elsewhere, env = installed
  where = subprocess.run([sys.executable, "-c", "import realign_jax.plumbing.gin_utils as g; "
                          "print(g.__file__); print(g.REPO_ROOT)"],
                         cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
  module_file, root = where.stdout.split()
  assert module_file.startswith(str(target)) and root == str(target / "realign_jax")
  # NOTE: the PPO config includes its model from gin/models/: both resolved
  # inside the installed package.
  out = subprocess.run([sys.executable, "-m", "realign_jax.train", "--help",
                        "--gin_file=configs/ppo/length_builtin_tiny.gin"],
                       cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert "--gin_search_paths" in out.stdout
  required = out.stdout.split("required macros of configs/ppo/length_builtin_tiny.gin:")[1]
  assert required.split() == ["MODEL_DIR", "INIT_CHECKPOINT"]
  # a typo in an override is caught by the installed binary's precheck, with the
  # configs and includes read from the wheel
  bad = subprocess.run([sys.executable, "-m", "realign_jax.train",
                        "--gin_file=configs/sft/builtin_tiny.gin", "--gin.TRAIN_STEPS=(("],
                       cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
  assert bad.returncode == 2 and bad.stderr.startswith("error: gin:"), bad.stderr
