#!/bin/bash
# DeepSpeed-Chat-style launcher script for examples/clm/main.py (a tiny Llama, from scratch).
#
#   bash examples/clm/run.sh [OUTPUT_DIR] [ZERO_STAGE] [DS_CONFIG]
#
# With DeepSpeed this line reads `deepspeed --num_gpus 2 main.py ...`; with zero-all it is
# `ds-launch`, same arguments. On a CPU-only machine --num_gpus is the number of worker processes.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUTPUT="${1:-./output/clm}"
ZERO_STAGE="${2:-2}"
DS_CONFIG="${3:-}"
NUM_GPUS="${NUM_GPUS:-2}"
mkdir -p "$OUTPUT"

# No hub here: build the tokenizer, the parquet dataset and the model config locally (once).
python "$HERE/../tools/make_assets.py" --out "$HERE/../assets"

EXTRA=()
if [ -n "$DS_CONFIG" ]; then EXTRA=(--deepspeed --deepspeed_config "$DS_CONFIG"); fi

ds-launch --num_gpus "$NUM_GPUS" "$HERE/main.py" \
   --data_path "$HERE/../assets/data/rm_pairs.parquet" \
   --data_split 9,1,0 \
   --data_output_path "$OUTPUT/data_cache" \
   --model_name_or_path "$HERE/../assets/tiny-llama" \
   --per_device_train_batch_size 8 \
   --per_device_eval_batch_size 32 \
   --max_seq_len 48 \
   --learning_rate 3e-3 \
   --weight_decay 0.01 \
   --num_train_epochs 1 \
   --gradient_accumulation_steps 1 \
   --lr_scheduler_type cosine \
   --num_warmup_steps 20 \
   --seed 1234 \
   --dtype bf16 \
   --zero_stage "$ZERO_STAGE" \
   --enable_tensorboard \
   --output_dir "$OUTPUT" \
   --checkpoint_dir "$OUTPUT/checkpoints" \
   "${EXTRA[@]}" \
   2>&1 | tee "$OUTPUT/training.log"
