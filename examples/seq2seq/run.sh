#!/bin/bash
# Launcher script for examples/seq2seq/main.py (a tiny T5 on translation pairs), with the
# Hugging Face "auto" ZeRO-2 config as users write it.
#
#   bash examples/seq2seq/run.sh [OUTPUT_DIR] [DS_CONFIG]
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUTPUT="${1:-./output/seq2seq}"
DS_CONFIG="${2:-$HERE/../deepspeed_configs/ds_config_zero2_auto.json}"
NUM_GPUS="${NUM_GPUS:-2}"
mkdir -p "$OUTPUT"

python "$HERE/../tools/make_assets.py" --out "$HERE/../assets"

ds-launch --num_gpus "$NUM_GPUS" "$HERE/main.py" \
   --data_path "$HERE/../assets/data/translation.jsonl" \
   --source_lang en --target_lang zx \
   --source_prefix "translate English to Zorbish: " \
   --data_split 9,1,0 \
   --data_output_path "$OUTPUT/data_cache" \
   --model_name_or_path "$HERE/../assets/tiny-t5" \
   --per_device_train_batch_size 8 \
   --per_device_eval_batch_size 32 \
   --max_seq_len 32 \
   --learning_rate 3e-3 \
   --num_train_epochs 2 \
   --num_warmup_steps 10 \
   --dtype bf16 \
   --enable_tensorboard \
   --output_dir "$OUTPUT" \
   --deepspeed --deepspeed_config "$DS_CONFIG" \
   2>&1 | tee "$OUTPUT/training.log"
