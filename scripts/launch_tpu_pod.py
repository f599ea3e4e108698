r"""Runs a binary on every worker of a Cloud TPU pod slice, or of several slices (multi-slice).

One slice: one `gcloud compute tpus tpu-vm ssh NAME --zone Z --worker=all
--command=...`; JAX finds the pod's other hosts itself.

  python scripts/launch_tpu_pod.py --tpu my-v4-32 --zone us-central2-b \
      --workdir '~/realign_jax' --dry_run -- \
      realign_jax.train --gin_file=configs/sft/builtin_tiny.gin --gin.MODEL_DIR="'gs://b/runs/sft'"

Multi-slice (`--num_slices N`): the slices are NAME-0 ... NAME-{N-1} (as
`gcloud compute tpus queued-resources create ... --node-count N --node-prefix
NAME` names them); every worker of slice i gets MEGASCALE_COORDINATOR_ADDRESS
(worker 0 of slice 0, looked up with `gcloud compute tpus tpu-vm describe`),
MEGASCALE_NUM_SLICES=N and MEGASCALE_SLICE_ID=i, one ssh per slice, run together.

The run directory must be one that every worker sees (a gs:// path or a shared
file system). `--dry_run` prints the shell script it would run.
"""

from __future__ import annotations

import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import launch_common  # noqa: E402  pylint: disable=g-import-not-at-top

MEGASCALE_PORT = 8080


def build(args, binary: list[str]) -> str:
  prog = "launch_tpu_pod.py"
  command = launch_common.binary_command(prog, binary, python=args.python)
  if args.workdir:
    # NOTE: not quoted, so that `~` expands on the worker.
    command = f"cd {args.workdir} && {command}"
  if args.setup:
    command = f"{args.setup} && {command}"
  where = ["--zone", args.zone] + (["--project", args.project] if args.project else [])
  if args.num_slices == 1:
    return shlex.join(["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.tpu, *where,
                       "--worker=all", f"--command={command}"]) + "\n"
  lines = ["set -euo pipefail",
           "COORDINATOR=$(" + shlex.join(
               ["gcloud", "compute", "tpus", "tpu-vm", "describe", f"{args.tpu}-0", *where,
                "--format=value(networkEndpoints[0].ipAddress)"]) + ")",
           "pids=()"]
  for i in range(args.num_slices):
    rest = f" MEGASCALE_NUM_SLICES={args.num_slices} MEGASCALE_SLICE_ID={i} {command}"
    # NOTE: "$COORDINATOR" is filled in here, on the launching machine; the
    # rest is quoted as is.
    lines.append(shlex.join(["gcloud", "compute", "tpus", "tpu-vm", "ssh", f"{args.tpu}-{i}",
                             *where, "--worker=all"])
                 + f' "--command=MEGASCALE_COORDINATOR_ADDRESS=$COORDINATOR:{MEGASCALE_PORT}"'
                 + shlex.quote(rest) + " &")
    lines.append("pids+=($!)")
  return "\n".join(lines + launch_common.WAIT_ALL) + "\n"


def main(argv: list[str]) -> int:
  own, binary = launch_common.split_binary(argv)
  p = launch_common.Parser(prog="launch_tpu_pod.py", description=__doc__.split("\n\n")[0])
  p.add_argument("--tpu", required=True, help="TPU VM name (multi-slice: the node prefix)")
  p.add_argument("--zone", required=True)
  p.add_argument("--project", default=None)
  p.add_argument("--num_slices", type=int, default=1)
  p.add_argument("--workdir", default=None, help="directory on the workers to run in")
  p.add_argument("--setup", default=None, help="shell command run first on each worker")
  p.add_argument("--python", default="python3")
  p.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
  args = p.parse_args(own)
  if args.num_slices < 1:
    launch_common.fail(p.prog, f"--num_slices={args.num_slices} must be >= 1")
  return launch_common.run_or_print(build(args, binary), args.dry_run)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
