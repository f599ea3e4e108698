r"""Writes an sbatch script that runs a binary on SLURM GPU nodes (one task per node) and submits it.

  python scripts/launch_slurm.py --nodes 2 --gpus_per_node 8 --partition gpu \
      --time 04:00:00 --script runs/sft_base.sbatch --dry_run -- \
      realign_jax.train --gin_file=configs/sft/builtin_tiny.gin --gin.MODEL_DIR="'runs/sft'"

`srun` starts one task per node; each task sees all the node's GPUs, and the
binaries find the other tasks from SLURM's variables (the coordinator is the
step's first node, see realign_jax.parallel.multihost). The run directory
must be on a file system every node sees. Without `--dry_run` the script is
written to `--script` and submitted with `sbatch`; with it, the script and the
`sbatch` command are printed and nothing is written or submitted.
"""

from __future__ import annotations

import os
import shlex
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import launch_common  # noqa: E402  pylint: disable=g-import-not-at-top


def sbatch_script(args, binary: list[str]) -> str:
  command = launch_common.binary_command("launch_slurm.py", binary, python=args.python)
  lines = ["#!/bin/bash",
           f"#SBATCH --job-name={args.job_name}",
           f"#SBATCH --nodes={args.nodes}",
           "#SBATCH --ntasks-per-node=1",
           f"#SBATCH --gpus-per-node={args.gpus_per_node}",
           f"#SBATCH --cpus-per-task={args.cpus_per_task}",
           f"#SBATCH --time={args.time}",
           f"#SBATCH --output={args.log_dir}/%x-%j.out"]
  for flag in ("partition", "account", "qos"):
    value = getattr(args, flag)
    if value:
      lines.append(f"#SBATCH --{flag}={value}")
  lines += ["set -euo pipefail"]
  if args.workdir:
    lines.append(f"cd {shlex.quote(args.workdir)}")
  if args.venv:
    lines.append(f"source {shlex.quote(os.path.join(args.venv, 'bin', 'activate'))}")
  lines += ["# NOTE: one task per node; the binary reads SLURM_* to join the others.",
            f"srun --ntasks-per-node=1 --kill-on-bad-exit=1 {command}"]
  return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
  own, binary = launch_common.split_binary(argv)
  p = launch_common.Parser(prog="launch_slurm.py", description=__doc__.split("\n\n")[0])
  p.add_argument("--nodes", type=int, required=True)
  p.add_argument("--gpus_per_node", type=int, required=True)
  p.add_argument("--time", required=True, help="wall-clock limit, e.g. 04:00:00")
  p.add_argument("--script", required=True, help="where to write the sbatch script")
  p.add_argument("--partition", default=None)
  p.add_argument("--account", default=None)
  p.add_argument("--qos", default=None)
  p.add_argument("--cpus_per_task", type=int, default=16)
  p.add_argument("--job_name", default="realign_jax")
  p.add_argument("--log_dir", default="slurm_logs")
  p.add_argument("--workdir", default=None, help="directory the job runs in")
  p.add_argument("--venv", default=None, help="virtual environment to activate")
  p.add_argument("--python", default="python")
  p.add_argument("--dry_run", action="store_true", help="print the script, write nothing")
  args = p.parse_args(own)
  for flag in ("nodes", "gpus_per_node", "cpus_per_task"):
    if getattr(args, flag) < 1:
      launch_common.fail(p.prog, f"--{flag}={getattr(args, flag)} must be >= 1")
  script = sbatch_script(args, binary)
  submit = shlex.join(["sbatch", args.script])
  if args.dry_run:
    sys.stdout.write(f"# {args.script}\n{script}# submitted with:\n{submit}\n")
    return 0
  folder = os.path.dirname(os.path.abspath(args.script))
  os.makedirs(folder, exist_ok=True)
  os.makedirs(args.log_dir if not args.workdir else os.path.join(args.workdir, args.log_dir),
              exist_ok=True)
  # NOTE: written whole or not at all.
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".sbatch.")
  with os.fdopen(fd, "w") as f:
    f.write(script)
  os.replace(tmp, args.script)
  return launch_common.run_or_print(submit, False)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
