#!/usr/bin/env bash
# Preference alignment (the exercise's finetune_preference.sh): reference log-probs once, then training.
#
# Step 1 `mllm logp` runs the reference model (= MODEL) over every pair, in one process, and caches the log-probs
# next to the data file ({stem}.{REF_NAME}.logp.jsonl; resumable; a stale cache is refused). Step 2 trains:
# torchrun over all GPUs with DeepSpeed when importable (configs/ds_zero2.json: no optimizer or scheduler block),
# plain DDP without it, one CPU process without GPUs. Override any variable from the environment:
#     MODEL=/path/to/MiniCPM-V-2_6 DATA=data/preference_train.json IMAGE_FOLDER=data bash scripts/finetune_preference.sh
# Extra arguments go to `mllm train preference` (e.g. --use_lora true --loss_type sigmoid --sft_weight 0.1).
set -euo pipefail

MODEL=${MODEL:-mllm/assets/tiny-base}             # the policy's start and the reference model (the shipped one)
WORLD=${WORLD:-runs/world}                         # the synthetic world the data defaults point into
[[ -z "${DATA:-}" ]] && WORLD_DEFAULT=1 || WORLD_DEFAULT=0
DATA=${DATA:-$WORLD/preference_train.json}         # [{idx, question, chosen, rejected, image_path|image}]
IMAGE_FOLDER=${IMAGE_FOLDER:-$WORLD}               # image_path values are relative to this folder
REF_NAME=${REF_NAME:-ref}
OUTPUT_DIR=${OUTPUT_DIR:-output/mllm_preference_training}
DS_CONFIG=${DS_CONFIG:-configs/ds_zero2.json}      # configs/ds_zero3.json for full tuning of the 8B model
MODEL_MAX_LENGTH=${MODEL_MAX_LENGTH:-2048}
MAX_SLICE_NUMS=${MAX_SLICE_NUMS:-9}
BETA=${BETA:-0.1}
LOSS_TYPE=${LOSS_TYPE:-nca_pair}                   # the exercise's loss; sigmoid = DPO, ipo
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6001}
PYTHON=${PYTHON:-python}

GPUS_PER_NODE=$($PYTHON -c "import torch; print(torch.cuda.device_count())")
HAS_DEEPSPEED=$($PYTHON -c "import importlib.util as u; print(int(u.find_spec('deepspeed') is not None))")

# The defaults point into a synthetic world; make it when it is missing (`mllm synth`, about a minute).
if [[ "$WORLD_DEFAULT" == 1 && ! -e "$WORLD/meta.json" ]]; then
    echo "making the synthetic world $WORLD (mllm synth)" >&2
    $PYTHON -m mllm.cli synth --out "$WORLD" --quiet
fi

# 1. reference log-probs, computed once with the same dtype, slicing and max length as the training below
$PYTHON -m mllm.cli logp --model "$MODEL" --data_path "$DATA" --image_folder "$IMAGE_FOLDER" \
    --ref_name "$REF_NAME" --model_max_length "$MODEL_MAX_LENGTH" --max_slice_nums "$MAX_SLICE_NUMS" \
    --dtype float32 --batch_size 4

TRAIN_ARGS=(
    --model_name_or_path "$MODEL"
    --data_path "$DATA"
    --image_folder "$IMAGE_FOLDER"
    --ref_name "$REF_NAME"
    --output_dir "$OUTPUT_DIR"
    --model_max_length "$MODEL_MAX_LENGTH"
    --max_slice_nums "$MAX_SLICE_NUMS"
    --tune_vision true
    --tune_llm true
    --beta "$BETA"
    --loss_type "$LOSS_TYPE"
    --use_average_logp true                         # as the exercise's provided script
    --num_train_epochs 5
    --per_device_train_batch_size 1
    --gradient_accumulation_steps 8                 # x GPUs: the reference's effective batch is 64
    --save_strategy steps
    --save_steps 500
    --save_total_limit 5
    --learning_rate 2e-5
    --weight_decay 0.01
    --warmup_steps 0.05                             # a float < 1 is a ratio of the total steps (v5)
    --lr_scheduler_type cosine
    --logging_steps 1
    --activation_checkpointing true
    --report_to tensorboard
)

if [[ "$GPUS_PER_NODE" -gt 0 ]]; then
    LAUNCH=($PYTHON -m torch.distributed.run --nproc_per_node "$GPUS_PER_NODE" --nnodes "$NNODES"
            --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
    # bf16 autocast moves the policy's log-probs away from the float32 reference: loosen the step-0 check
    TRAIN_ARGS+=(--bf16 true --model_dtype float32 --reference_check_tolerance 0.5)
    if [[ "$HAS_DEEPSPEED" == "1" ]]; then
        TRAIN_ARGS+=(--deepspeed "$DS_CONFIG")
    else
        echo "deepspeed is not installed: plain DDP over $GPUS_PER_NODE GPU(s) (pip install -e '.[deepspeed]')" >&2
    fi
else
    echo "no GPU: training on the CPU in one process" >&2
    LAUNCH=($PYTHON)
    TRAIN_ARGS+=(--use_cpu true)
fi

echo "MODEL=$MODEL DATA=$DATA OUTPUT_DIR=$OUTPUT_DIR LOSS_TYPE=$LOSS_TYPE BETA=$BETA" >&2
exec "${LAUNCH[@]}" -m mllm.cli train preference "${TRAIN_ARGS[@]}" "$@"
