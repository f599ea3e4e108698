r"""Runs a binary on one machine with several GPUs.

By default one process drives every GPU (the mesh spans them all):

  python scripts/launch_gpu_host.py --dry_run -- \
      realign_jax.train --gin_file=configs/sft/builtin_tiny.gin --gin.MODEL_DIR="'runs/sft'"

With `--num_processes N` it starts N processes on this host, process i seeing
GPUs i*G/N ... (i+1)*G/N - 1 of `--gpus G`, joined through a coordinator on
127.0.0.1:`--port` (the layout of a multi-host run, rehearsed on one host).
`--dry_run` prints the shell script it would run.
"""

from __future__ import annotations

import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import launch_common  # noqa: E402  pylint: disable=g-import-not-at-top


def build(args, binary: list[str]) -> str:
  command = launch_common.binary_command("launch_gpu_host.py", binary, python=args.python)
  if args.num_processes == 1:
    prefix = f"CUDA_VISIBLE_DEVICES={shlex.quote(args.visible)} " if args.visible else ""
    return prefix + command + "\n"
  per = args.gpus // args.num_processes
  lines = ["set -euo pipefail", "pids=()"]
  for i in range(args.num_processes):
    gpus = ",".join(str(g) for g in range(i * per, (i + 1) * per))
    lines.append(f"CUDA_VISIBLE_DEVICES={gpus} JAX_COORDINATOR_ADDRESS=127.0.0.1:{args.port} "
                 f"JAX_NUM_PROCESSES={args.num_processes} JAX_PROCESS_ID={i} {command} &")
    lines.append("pids+=($!)")
  return "\n".join(lines + launch_common.WAIT_ALL) + "\n"


def main(argv: list[str]) -> int:
  own, binary = launch_common.split_binary(argv)
  p = launch_common.Parser(prog="launch_gpu_host.py", description=__doc__.split("\n\n")[0])
  p.add_argument("--num_processes", type=int, default=1)
  p.add_argument("--gpus", type=int, default=None,
                 help="GPUs on this host (required with --num_processes > 1)")
  p.add_argument("--visible", default=None, help="CUDA_VISIBLE_DEVICES for one process")
  p.add_argument("--port", type=int, default=12355)
  p.add_argument("--python", default="python")
  p.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
  args = p.parse_args(own)
  if args.num_processes < 1:
    launch_common.fail(p.prog, f"--num_processes={args.num_processes} must be >= 1")
  if args.num_processes > 1:
    if args.gpus is None:
      launch_common.fail(p.prog, "--gpus is required with --num_processes > 1")
    if args.gpus < args.num_processes or args.gpus % args.num_processes:
      launch_common.fail(p.prog, f"--gpus={args.gpus} must be a multiple of "
                         f"--num_processes={args.num_processes}")
  return launch_common.run_or_print(build(args, binary), args.dry_run)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
