#!/bin/bash
# Compile time and compiled memory per device of the T5.1.1 train steps on a CPU
# with 8 simulated devices (data axis 8, FSDP). Run from the repository root:
#   bash benchmarks/results/cpu_compile.sh
# Each JSON file holds the benchmark's last stdout line; a run stopped by the
# 15-minute bound writes {"timed_out_after_s": 900} instead (SIGKILL: the
# trainer catches SIGTERM to checkpoint). REMAT=full selects a remat policy.
set -u -o pipefail
export XLA_FLAGS=--xla_force_host_platform_device_count=8
out=benchmarks/results
run() {  # NAME ARGS...
  local name=$1; shift
  local line
  # NOTE: /usr/bin/time writes the whole process's CPU seconds to $name.time.
  if line=$(/usr/bin/time -o "$out/$name.time" -f "process user_s %U sys_s %S wall_s %e" \
      timeout -s KILL 900 python benchmarks/train_step.py --json --fsdp --compile_only "$@" \
      | tail -1); then
    echo "$line" > "$out/$name.json"
  else
    echo '{"timed_out_after_s": 900, "args": "'"$*"'"}' > "$out/$name.json"
  fi
  echo "$name: $(cat "$out/$name.json")"
}
XL="--algorithm sft --size t5_1_1_xl --batch 16 --input_length 256 --target_length 32 --scan_layers=true"
PPO="--algorithm ppo --size t5_1_1_large --batch 16 --input_length 256 --target_length 32"
run cpu8_t5_1_1_large_ppo_scanned $PPO --scan_layers=true ${REMAT:+--remat_policy=$REMAT}
run cpu8_t5_1_1_xl_sft_scanned $XL ${REMAT:+--remat_policy=$REMAT}
run cpu8_t5_1_1_xl_sft_scanned_remat_full $XL --remat_policy=full
run cpu8_t5_1_1_xl_sft_scanned_remat_dots $XL --remat_policy=dots_saveable
run cpu8_t5_1_1_large_ppo_unrolled $PPO --scan_layers=false ${REMAT:+--remat_policy=$REMAT}
