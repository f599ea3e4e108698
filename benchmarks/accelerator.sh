#!/bin/bash
# Every accelerator figure in one call (under 8 minutes on one H100 or H200):
#   bash benchmarks/accelerator.sh [--out DIR]          # on a GPU or TPU
#   bash benchmarks/accelerator.sh --smoke [--out DIR]  # tiny sizes on the CPU, seconds
# One JSON per figure, named by device (h100_..., h200_..., cpu_smoke_...), under DIR
# (default benchmarks/results; runs/accelerator_smoke with --smoke):
#   DEV_t5_1_1_large_sft.json  T5.1.1-large SFT, bf16, batch 32, 512/128 tokens, scanned
#                              layers, remat (dots_saveable), fused attention
#                              (dot_product): step time, tokens/s, MFU, compiled FLOPs
#                              and bytes (benchmarks/train_step.py)
#   DEV_t5_1_1_large_ppo.json  T5.1.1-large PPO step, same settings: step time, tokens/s
#   DEV_decode.json            DeRa over single-model decoding (T5.1.1-small) and the
#                              lambda sweep's speedup (benchmarks/decode.py)
#   DEV_transfer_q.json        Transfer Q*'s forked speedup (benchmarks/transfer_q.py)
#   DEV_serving.json           the serving benchmark, once benchmarks/serve.py exists
# Each JSON is the benchmark's own output plus "figure" and the "command" that made it;
# a figure that fails or overruns its bound gets {"figure", "command", "error"} and the
# script exits 1 after the others ran. Compilations go to a persistent cache
# (JAX_COMPILATION_CACHE_DIR, default runs/jax_cache_accelerator), so a second call on
# the same machine measures steps, not compiles. Without an accelerator and without
# --smoke: one line, exit 2.
set -u -o pipefail
cd "$(dirname "$0")/.."
smoke=0
out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) smoke=1 ;;
    --out) out=${2:?--out needs a directory}; shift ;;
    --out=*) out=${1#--out=} ;;
    *) echo "error: unknown argument $1; usage: bash benchmarks/accelerator.sh [--smoke]" \
           "[--out DIR]" >&2; exit 2 ;;
  esac
  shift
done
export TF_CPP_MIN_LOG_LEVEL=3
# NOTE: settings already in the environment win (the test suite's one cache).
: "${JAX_COMPILATION_CACHE_DIR:=runs/jax_cache_accelerator}"
: "${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:=0}"
: "${JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES:=0}"
export JAX_COMPILATION_CACHE_DIR JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS
export JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES
if [ $smoke -eq 1 ]; then
  # NOTE: tiny programs compile for far longer than they run: skip LLVM's
  # optimisation (as the test suite does; the semantics are the same). One CPU
  # device, as one GPU.
  export XLA_FLAGS="--xla_backend_optimization_level=0"
  export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
fi
# The device: its platform and a short name (NVIDIA H100 80GB HBM3 -> h100).
dev=$(python - <<'EOF'
import re
import jax
d = jax.devices()[0]
words = d.device_kind.split()
name = words[1] if words[0] == "NVIDIA" and len(words) > 1 else d.device_kind
print(d.platform, re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or d.platform)
EOF
) || { echo "error: JAX could not start (python -c 'import jax; jax.devices()' fails)" >&2
       exit 2; }
platform=${dev%% *}
dev=${dev#* }
if [ "$platform" = cpu ] && [ $smoke -eq 0 ]; then
  echo "error: no accelerator: JAX sees only the CPU; run this on a GPU or TPU machine, or" \
       "check the CPU path with: bash benchmarks/accelerator.sh --smoke" >&2
  exit 2
fi
if [ $smoke -eq 1 ]; then
  dev="${dev}_smoke"
  out=${out:-runs/accelerator_smoke}
fi
out=${out:-benchmarks/results}
mkdir -p "$out" "$JAX_COMPILATION_CACHE_DIR"
failed=0

figure() {  # NAME BOUND_S ARGS...: one JSON from the last stdout line of ARGS
  local name=$1 bound=$2; shift 2
  local file="$out/${dev}_$name.json" log="$out/${dev}_$name.log" line rc t0=$SECONDS
  line=$(timeout -s KILL "$bound" "$@" 2>"$log" | tail -1)
  rc=$?
  python - "$file" "$name" "$rc" "$bound" "$line" "$log" "$*" <<'EOF'
import json, sys
file, name, rc, bound, line, log, cmd = sys.argv[1:]
head = {"figure": name, "command": cmd}
try:
  out = dict(head, **json.loads(line)) if rc == "0" else None
except ValueError:
  out = None
if out is None:
  with open(log) as f:
    last = (f.read().strip().splitlines() or [""])[-1]
  error = f"overran its {bound} s bound" if rc == "137" else f"exit {rc}: {last}"
  out = dict(head, error=error)
with open(file, "w") as f:
  json.dump(out, f)
  f.write("\n")
sys.exit(0 if "error" not in out else 1)
EOF
  if [ $? -ne 0 ]; then
    failed=1
    echo "$name: FAILED ($(( SECONDS - t0 )) s): $(cat "$file")" >&2
  else
    rm -f "$log"
    echo "$name: $file ($(( SECONDS - t0 )) s)" >&2
  fi
}

STEP="python benchmarks/train_step.py --json --scan_layers=true"
if [ $smoke -eq 1 ]; then
  T5="--size t5_tiny --dtype float32 --batch 8 --input_length 32 --target_length 8 --steps 3"
  figure t5_1_1_large_sft 120 $STEP --algorithm sft $T5 --remat_policy=dots_saveable \
      --attention_impl=dot_product
  figure t5_1_1_large_ppo 120 $STEP --algorithm ppo $T5
  figure decode 120 python benchmarks/decode.py --json --sizes t5_tiny --batch 2 \
      --new_tokens 4 --repeats 1
  figure transfer_q 120 python benchmarks/transfer_q.py --json --sizes t5_tiny --batch 2 \
      --new_tokens 2 --k 2 --horizon 3 --repeats 1
else
  T5="--size t5_1_1_large --dtype bfloat16 --batch 32 --input_length 512 --target_length 128"
  figure t5_1_1_large_sft 150 $STEP --algorithm sft $T5 --steps 20 \
      --remat_policy=dots_saveable --attention_impl=dot_product
  figure t5_1_1_large_ppo 150 $STEP --algorithm ppo $T5 --steps 5 \
      --remat_policy=dots_saveable --attention_impl=dot_product
  figure decode 75 python benchmarks/decode.py --json --sizes t5_tiny,t5_1_1_small
  figure transfer_q 75 python benchmarks/transfer_q.py --json --sizes t5_tiny,t5_1_1_small
fi
if [ -f benchmarks/serve.py ]; then
  figure serving 120 python benchmarks/serve.py --json $([ $smoke -eq 1 ] && echo --smoke)
fi
exit $failed
