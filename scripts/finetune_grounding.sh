#!/usr/bin/env bash
# Visual-grounding fine-tuning (the exercise's finetune_grounding.sh): Shikra REC annotations are turned into
# "[x0,y0,x1,y1]" conversations (mllm grounding prepare) and the model is fine-tuned on them (mllm train sft),
# then scored on the eval REC files (Acc@0.5). Every variable below can be overridden from the environment:
#     MODEL=/path/to/MiniCPM-V-2_6 REC="data/REC_refcoco_unc_train.jsonl" IMAGE_FOLDER=coco/train2014 \
#         EVAL_REC="data/REC_refcoco_unc_val.jsonl" bash scripts/finetune_grounding.sh
# REC and EVAL_REC are space-separated lists. SQUARE_PAD=true uses the exercise's padded-square frame (train and
# evaluate with the same choice). Extra arguments are passed through (e.g. --use_lora true --max_steps 50).
set -euo pipefail

MODEL=${MODEL:-mllm/assets/tiny-base}             # the shipped tiny model
WORLD=${WORLD:-runs/world}                         # the synthetic world the data defaults point into
[[ -z "${REC:-}" ]] && WORLD_DEFAULT=1 || WORLD_DEFAULT=0
REC=${REC:-$WORLD/rec_train.jsonl}                 # Shikra REC jsonl file(s)
EVAL_REC=${EVAL_REC-$WORLD/rec_test.jsonl}         # REC jsonl file(s) scored after training (Acc@0.5; empty: none)
EVAL_LIMIT=${EVAL_LIMIT:-}                         # expressions per eval split (empty: all)
IMAGE_FOLDER=${IMAGE_FOLDER:-$WORLD}               # img_path values are relative to this folder
MIX=${MIX:-}                                       # general SFT JSON mixed in against forgetting
MIX_RATIO=${MIX_RATIO:-0.15}
STYLE=${STYLE:-plain}                              # plain [x0,y0,x1,y1] or qwen <box>(x0,y0),(x1,y1)</box>
SQUARE_PAD=${SQUARE_PAD:-false}
OUTPUT_DIR=${OUTPUT_DIR:-output/mllm_grounding}
DS_CONFIG=${DS_CONFIG:-configs/ds_zero2.json}
MODEL_MAX_LENGTH=${MODEL_MAX_LENGTH:-2048}
MAX_SLICE_NUMS=${MAX_SLICE_NUMS:-9}
MASTER_PORT=${MASTER_PORT:-6001}
PYTHON=${PYTHON:-python}

GPUS_PER_NODE=$($PYTHON -c "import torch; print(torch.cuda.device_count())")
HAS_DEEPSPEED=$($PYTHON -c "import importlib.util as u; print(int(u.find_spec('deepspeed') is not None))")

# The defaults point into a synthetic world; make it when it is missing (`mllm synth`, about a minute).
if [[ "$WORLD_DEFAULT" == 1 && ! -e "$WORLD/meta.json" ]]; then
    echo "making the synthetic world $WORLD (mllm synth)" >&2
    $PYTHON -m mllm.cli synth --out "$WORLD" --quiet
fi

# shellcheck disable=SC2206  # REC / EVAL_REC are deliberately word-split into lists
ARGS=(
    --model_name_or_path "$MODEL"
    --rec $REC
    --image_folder "$IMAGE_FOLDER"
    --style "$STYLE"
    --square_pad "$SQUARE_PAD"
    --output_dir "$OUTPUT_DIR"
    --model_max_length "$MODEL_MAX_LENGTH"
    --max_slice_nums "$MAX_SLICE_NUMS"
    --tune_vision true
    --tune_llm false
    --max_steps 10000
    --per_device_train_batch_size 1
    --gradient_accumulation_steps 1
    --save_strategy steps
    --save_steps 1000
    --save_total_limit 10
    --learning_rate 1e-6
    --weight_decay 0.1
    --adam_beta2 0.95
    --warmup_steps 0.01                             # a float < 1 is a ratio of the total steps (v5)
    --lr_scheduler_type cosine
    --logging_steps 1
    --activation_checkpointing true
    --report_to tensorboard
)
[[ -n "$MIX" ]] && ARGS+=(--mix "$MIX" --mix_ratio "$MIX_RATIO")
# shellcheck disable=SC2206
[[ -n "$EVAL_REC" ]] && ARGS+=(--eval_rec $EVAL_REC)
[[ -n "$EVAL_LIMIT" ]] && ARGS+=(--eval_limit "$EVAL_LIMIT")

if [[ "$GPUS_PER_NODE" -gt 0 ]]; then
    LAUNCH=($PYTHON -m torch.distributed.run --nproc_per_node "$GPUS_PER_NODE" --master_port "$MASTER_PORT")
    ARGS+=(--bf16 true --model_dtype float32)
    [[ "$HAS_DEEPSPEED" == "1" ]] && ARGS+=(--deepspeed "$DS_CONFIG")
else
    echo "no GPU: training on the CPU in one process" >&2
    LAUNCH=($PYTHON)
    ARGS+=(--use_cpu true)
fi

exec "${LAUNCH[@]}" -m mllm.cli train grounding "${ARGS[@]}" "$@"
