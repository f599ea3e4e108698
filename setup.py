"""Packaging shim over pyproject.toml (which holds the metadata and dependencies).

It lists the packages: `realign_jax` and, as package data inside it, the
top-level `configs/` and `gin/` (installed as `realign_jax/configs` and
`realign_jax/gin`), so that an installed wheel finds
`--gin_file=configs/...` and `include 'gin/...'` from any directory
(see realign_jax/plumbing/gin_utils.py).
"""

import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _config_packages():
  """{package name: source folder} for configs/ and gin/ and their sub-folders."""
  out = {}
  for top in ("configs", "gin"):
    for root, dirs, _ in os.walk(os.path.join(HERE, top)):
      dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")))
      rel = os.path.relpath(root, HERE)
      out["realign_jax." + rel.replace(os.sep, ".")] = rel
  return out


CONFIGS = _config_packages()

setup(
    packages=find_packages(include=["realign_jax", "realign_jax.*"]) + sorted(CONFIGS),
    package_dir=CONFIGS,
    package_data={"realign_jax": ["data/builtin/*"], **{name: ["*.gin"] for name in CONFIGS}},
)
