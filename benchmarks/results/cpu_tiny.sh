#!/bin/bash
# Tiny T5 SFT on the CPU (one device): compile and step time, scanned vs unrolled.
# Run from the repository root: bash benchmarks/results/cpu_tiny.sh
set -u -o pipefail
for scan in false true; do
  python benchmarks/train_step.py --json --algorithm sft --size t5_tiny --dtype float32 \
      --batch 8 --input_length 128 --target_length 32 --steps 12 --scan_layers=$scan \
      | tail -1 > benchmarks/results/cpu1_t5_tiny_sft_scan_$scan.json
  cat benchmarks/results/cpu1_t5_tiny_sft_scan_$scan.json
done
