#!/usr/bin/env bash
# Answer Object HalBench questions, then score CHAIR (the exercise's eval.sh + chair_eval.sh).
#     MODEL=/path/to/MiniCPM-V-2_6 QUESTIONS=data/objhal_bench.jsonl COCO=data/annotations bash scripts/eval.sh
# Without MODEL the shipped tiny model is used; without QUESTIONS a synthetic bench is generated and scored
# against its own ground truth. Resumable: rerun after an interruption and only missing answers are generated.
set -euo pipefail

MODEL=${MODEL:-}
QUESTIONS=${QUESTIONS:-}
COCO=${COCO:-}                      # folder with instances_/captions_{train,val}2014.json (real bench only)
CHAIR_PKL=${CHAIR_PKL:-}            # or an existing chair_300.pkl (converted through a restricted unpickler)
CHAIR_VOCABULARY=${CHAIR_VOCABULARY:-original}  # COCO tables: original (published CHAIR) or mllm (revised)
OUT=${OUT:-output/eval}
DECODING=${DECODING:-sample}        # the exercise samples; greedy and beam give steadier numbers
MLLM=${MLLM:-mllm}
N_TEST=${N_TEST:-100}               # scenes of the synthetic bench (without QUESTIONS)

mkdir -p "$OUT"
model_args=()
[[ -n "$MODEL" ]] && model_args=(--model "$MODEL")
if [[ -z "$QUESTIONS" ]]; then
    "$MLLM" synth --out "$OUT/world" --n-train 0 --n-test "$N_TEST" --seed 7
    QUESTIONS="$OUT/world/bench.jsonl"
    gt_args=(--chair-gt "$OUT/world/chair_gt.json")
elif [[ -n "$CHAIR_PKL" ]]; then
    gt_args=(--chair-pkl "$CHAIR_PKL" --trust-pickle --vocabulary "$CHAIR_VOCABULARY")
else
    gt_args=(--coco-annotations "$COCO" --vocabulary "$CHAIR_VOCABULARY")
fi

"$MLLM" answer "${model_args[@]}" --questions "$QUESTIONS" --out "$OUT/answers.jsonl" --decoding "$DECODING"
"$MLLM" eval chair --answers "$OUT/answers.jsonl" "${gt_args[@]}" --out "$OUT/chair.json"
