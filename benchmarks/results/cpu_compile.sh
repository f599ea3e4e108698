#!/bin/bash
# Compile time and compiled memory per device on a CPU with 8 simulated devices:
# the T5.1.1 train steps (data axis 8, FSDP), the Llama-style decoders' PPO and DPO
# steps (data 4 x model 2, FSDP) and the DeRa decode of a 7B pair (model axis 8).
# Run from the repository root:
#   bash benchmarks/results/cpu_compile.sh            # every figure, one after another
#   bash benchmarks/results/cpu_compile.sh NAME...    # only those (names below)
# Each JSON file holds the benchmark's last stdout line; a run stopped by the
# 15-minute bound writes {"timed_out_after_s": 900} instead (SIGKILL: the
# trainer catches SIGTERM to checkpoint), a refused one its error line. REMAT=full
# selects a remat policy for the runs that do not name one.
set -u -o pipefail
export XLA_FLAGS=--xla_force_host_platform_device_count=8
out=benchmarks/results
only=" $* "
run() {  # NAME ARGS...
  local name=$1; shift
  [ "$only" = "  " ] || [[ "$only" == *" $name "* ]] || return 0
  local line rc err
  err=$(mktemp)
  # NOTE: /usr/bin/time writes the whole process's CPU seconds to $name.time.
  line=$(/usr/bin/time -o "$out/$name.time" -f "process user_s %U sys_s %S wall_s %e" \
      timeout -s KILL 900 python benchmarks/train_step.py --json --compile_only "$@" \
      2>"$err" | tail -1)
  rc=$?
  if [ $rc -eq 0 ]; then  # the figures, with the command that made them
    python -c 'import json, sys
print(json.dumps(dict(json.loads(sys.argv[1]), command=sys.argv[2])))' \
        "$line" "bash benchmarks/results/cpu_compile.sh $name  # train_step.py $*" \
        > "$out/$name.json"
  elif [ $rc -eq 2 ]; then  # refused (bad input): its one line
    line=$(tail -1 "$err")
    echo '{"refused": "'"${line//\"/\'}"'", "args": "'"$*"'"}' > "$out/$name.json"
  elif [ $rc -eq 137 ]; then
    echo '{"timed_out_after_s": 900, "args": "'"$*"'"}' > "$out/$name.json"
  else
    line=$(tail -1 "$err")
    echo '{"failed_rc": '$rc', "error": "'"${line//\"/\'}"'", "args": "'"$*"'"}' \
        > "$out/$name.json"
  fi
  rm -f "$err"
  echo "$name: $(cat "$out/$name.json")"
}
T5="--fsdp --batch 16 --input_length 256 --target_length 32"
XL="--algorithm sft --size t5_1_1_xl --scan_layers=true $T5"
PPO="--algorithm ppo --size t5_1_1_large $T5"
DEC="--fsdp --mesh_data 4 --mesh_model 2 --batch 16 --input_length 256 --target_length 32"
run cpu8_t5_1_1_large_ppo_scanned $PPO --scan_layers=true ${REMAT:+--remat_policy=$REMAT}
run cpu8_t5_1_1_xl_sft_scanned $XL ${REMAT:+--remat_policy=$REMAT}
run cpu8_t5_1_1_xl_sft_scanned_remat_full $XL --remat_policy=full
run cpu8_t5_1_1_xl_sft_scanned_remat_dots $XL --remat_policy=dots_saveable
run cpu8_decoder_1b_ppo --algorithm ppo --size decoder_1b $DEC
run cpu8_decoder_1b_dpo --algorithm dpo --size decoder_1b $DEC
run cpu8_decoder_7b_ppo --algorithm ppo --size decoder_7b $DEC --remat_policy=full
run cpu8_decoder_7b_dpo --algorithm dpo --size decoder_7b $DEC --remat_policy=full
run cpu8_decoder_7b_dera --algorithm dera --size decoder_7b --mesh_data 1 --mesh_model 8 \
    --batch 8 --input_length 256 --target_length 64
# NOTE: last: it did not compile within the bound (cpu8_t5_1_1_large_ppo_unrolled.json).
run cpu8_t5_1_1_large_ppo_unrolled $PPO --scan_layers=false ${REMAT:+--remat_policy=$REMAT}
