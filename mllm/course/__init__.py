"""`mllm course`: the exercise's arc on a 2-core CPU with the tiny model, stage by stage.

    base        synthetic world (with caption noise) -> tokenizer -> tiny model from random init: vision
                pretraining on the scenes' labels, then the LLM reads scenes as slot vectors (`read`), the
                vision side is aligned to them with the LLM frozen (`align`), everything is tuned (`tune`),
                all on fresh scenes, then rounds of DPO on its own greedy descriptions corrected from their
                first error (`polish`) -> CHAIR on the bench, yes/no accuracy per kind, grounding
    sft         SFT of the base model on the yes/no set: test loss and accuracy before and after
    grounding   held-out Acc@IoU>=0.5 of the base model, grounding fine-tuning, Acc@0.5 again
                (`mllm.course.grounding.course_stage`)
    preference  CHAIR of the base model, reference log-probs, preference training, CHAIR again
                (`mllm.course.preference.course_stage`)

Each stage writes its folder under `--out` (model, answers, metrics JSON, plots) and adds a row to
`results.json`; `course.md` is the table of every stage run so far. A stage reuses what earlier stages left
(the world, the base model), so each can be run alone once its inputs exist. `--quick` shrinks every budget
to a few minutes in total; the numbers it gives are not the course's targets.

Modules: one per stage (`base` with `polish`, `sft`, `grounding`, `preference`, with `self_pairs`), `shared` (the
budget, the world and the evaluations every stage runs), `runner` (stage dispatch and the results table), `demo`.
"""
