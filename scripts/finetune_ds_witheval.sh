#!/usr/bin/env bash
# Supervised fine-tuning with evaluation (the exercise's finetune_ds_witheval.sh).
#
# With GPUs and an importable `deepspeed`: torchrun over all GPUs with a DeepSpeed ZeRO config (no optimizer or
# scheduler block in it, so --lr_scheduler_type is what actually runs). With GPUs but no deepspeed: plain
# torchrun DDP. Without GPUs: one CPU process. Every variable below can be overridden from the environment:
#     MODEL=/path/to/MiniCPM-V-2_6 DATA=data/train.json EVAL_DATA=data/test.json bash scripts/finetune_ds_witheval.sh
# Extra arguments are passed through to `mllm train sft` (e.g. --use_lora true --max_steps 50).
set -euo pipefail

MODEL=${MODEL:-mllm/assets/tiny-base}             # model folder: config.json + safetensors + tokenizer (the shipped one)
WORLD=${WORLD:-runs/world}                         # the synthetic world the data defaults point into
[[ -z "${DATA:-}" ]] && WORLD_DEFAULT=1 || WORLD_DEFAULT=0
DATA=${DATA:-$WORLD/sft_train.json}                # training records (exercise format)
EVAL_DATA=${EVAL_DATA:-$WORLD/sft_test.json}       # evaluation records (eval loss + yes/no accuracy)
IMAGE_FOLDER=${IMAGE_FOLDER:-$WORLD}               # the records' image paths are relative to this folder
OUTPUT_DIR=${OUTPUT_DIR:-output/mllm_sft_training}
DS_CONFIG=${DS_CONFIG:-configs/ds_zero2.json}      # configs/ds_zero3.json for full tuning of the 8B model
LLM_TYPE=${LLM_TYPE:-qwen2}                        # informational: the chat template is the tokenizer's own
MODEL_MAX_LENGTH=${MODEL_MAX_LENGTH:-2048}         # raise for multi-image data (the reference advises 4096)
MAX_SLICE_NUMS=${MAX_SLICE_NUMS:-9}
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

TRAIN_ARGS=(
    --model_name_or_path "$MODEL"
    --data_path "$DATA"
    --eval_data_path "$EVAL_DATA"
    --image_folder "$IMAGE_FOLDER"
    --output_dir "$OUTPUT_DIR"
    --model_max_length "$MODEL_MAX_LENGTH"
    --max_slice_nums "$MAX_SLICE_NUMS"
    --tune_vision true
    --tune_llm false
    --max_steps 10000
    --per_device_train_batch_size 1
    --per_device_eval_batch_size 1
    --gradient_accumulation_steps 1
    --eval_strategy steps
    --eval_steps 1000
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

if [[ "$GPUS_PER_NODE" -gt 0 ]]; then
    LAUNCH=($PYTHON -m torch.distributed.run --nproc_per_node "$GPUS_PER_NODE" --nnodes "$NNODES"
            --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
    TRAIN_ARGS+=(--bf16 true --model_dtype float32)
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

echo "LLM_TYPE=$LLM_TYPE MODEL=$MODEL DATA=$DATA OUTPUT_DIR=$OUTPUT_DIR" >&2
exec "${LAUNCH[@]}" -m mllm.cli train sft "${TRAIN_ARGS[@]}" "$@"
