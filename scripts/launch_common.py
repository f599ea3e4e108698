"""What the launchers (launch_tpu_pod.py, launch_slurm.py, launch_gpu_host.py) share.

Each launcher builds the exact shell text it would run; `--dry_run` prints it
and runs nothing. The binary and its arguments follow `--`:

  ... -- realign_jax.train --gin_file=configs/sft/builtin_tiny.gin --gin.MODEL_DIR="'runs/x'"
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys

BINARIES = ("realign_jax.train", "realign_jax.decode", "realign_jax.evaluate",
            "realign_jax.synthetic_preferences", "realign_jax.experiments.frontier",
            "realign_jax.experiments.length_reward", "realign_jax.experiments.tldr_style")


class Parser(argparse.ArgumentParser):
  """argparse with one-line errors (`error: ...`, exit 2)."""

  def error(self, message):
    print(f"error: {self.prog}: {message}", file=sys.stderr)
    sys.exit(2)


# The end of a script that started processes in the background (pids+=($!)): wait for all,
# exit with the last failure's status.
WAIT_ALL = ["status=0", 'for p in "${pids[@]}"; do wait "$p" || status=$?; done', "exit $status"]


def fail(prog: str, message: str) -> None:
  print(f"error: {prog}: {message}", file=sys.stderr)
  sys.exit(2)


def split_binary(argv: list[str]) -> tuple[list[str], list[str]]:
  """(launcher arguments, [module, binary arguments...]) split at `--`."""
  if "--" not in argv:
    return argv, []
  i = argv.index("--")
  return argv[:i], argv[i + 1:]


def binary_command(prog: str, binary: list[str], python: str = "python") -> str:
  """`python -m MODULE ARGS...`, quoted for a POSIX shell."""
  if not binary:
    fail(prog, "no binary given: end the command with -- MODULE ARGS..., e.g. "
         "-- realign_jax.train --gin_file=configs/sft/builtin_tiny.gin")
  module, args = binary[0], binary[1:]
  if module not in BINARIES:
    fail(prog, f"{module!r} is not one of the binaries ({', '.join(BINARIES)})")
  if not any(a.startswith("--gin_file") for a in args):
    fail(prog, f"{module} needs a --gin_file argument after --")
  return shlex.join([python, "-m", module, *args])


def run_or_print(script: str, dry_run: bool) -> int:
  """Prints `script` (dry run) or runs it with bash, returning its exit status."""
  if dry_run:
    sys.stdout.write(script if script.endswith("\n") else script + "\n")
    return 0
  return subprocess.call(["bash", "-c", script])
