"""`mllm train grounding`: visual-grounding fine-tuning, a thin recipe over `mllm.train.sft.train`.

    mllm train grounding --model_name_or_path DIR --rec REC_refcoco_unc_train.jsonl [--rec ...] \\
        --image_folder coco/train2014 --output_dir output/mllm_grounding [--mix sft_train.json --mix_ratio 0.15] \\
        [--eval_rec REC_refcoco_unc_val.jsonl --eval_limit 500] [any `mllm train sft` option]

1. With `--rec` / `--flickr` files, `mllm.data.grounding_prepare.prepare` writes the conversations (and their
   report) to `<output_dir>/grounding_train.json`; with `--data_path` an already prepared file is used.
2. `mllm.train.sft.train` fine-tunes (every SFT option works; the recipe only changes defaults: no yes/no
   generation during evaluation, a log every 10 steps).
3. With `--eval_rec`, the trained model answers those REC files (`mllm.eval.grounding.evaluate_model`) and the
   Acc@0.5 table is printed and written to `<output_dir>/grounding_eval/grounding.json`.

The course's grounding stage on the synthetic world is `mllm.course.grounding.course_stage`.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from mllm.data.formats import DATA_FORMATS
from mllm.train.sft import DataArguments, ModelArguments, SFTTrainingArguments


@dataclass
class GroundingDataArguments:
    rec: list[str] = field(default_factory=list, metadata={"help": "one or more Shikra REC jsonl files"})
    flickr: list[str] = field(default_factory=list,
                              metadata={"help": "one or more Flickr30k-entities jsonl files (gc task)"})
    data_path: str | None = field(default=None, metadata={"help": "already prepared conversations (any SFT format)"})
    data_format: str = field(default="auto", metadata={"help": "record format of --data_path / --eval_data_path",
                                                       "choices": list(DATA_FORMATS)})
    image_folder: str = field(default=".", metadata={"help": "folder the image paths are relative to"})
    tasks: str = field(default="rec", metadata={"help": "comma-separated: rec, reg, gc"})
    style: str = field(default="plain", metadata={"help": "box text: plain [x0,y0,x1,y1] or qwen <box>",
                                                  "choices": ["plain", "qwen"]})
    templates: str = field(default="first", metadata={"help": "prompt template: first or random",
                                                      "choices": ["first", "random"]})
    square_pad: bool = field(default=False, metadata={"help": "the exercise's padded square frame"})
    mix: str | None = field(default=None, metadata={"help": "general SFT JSON mixed in against forgetting"})
    mix_ratio: float = field(default=0.15, metadata={"help": "fraction of the training set taken from --mix"})
    eval_data_path: str | None = field(default=None, metadata={"help": "SFT-format eval file (eval loss)"})
    eval_rec: list[str] = field(default_factory=list, metadata={"help": "REC jsonl files scored after training"})
    eval_limit: int | None = field(default=None, metadata={"help": "expressions per eval split"})
    model_max_length: int = 2048
    max_slice_nums: int | None = None


@dataclass
class GroundingTrainingArguments(SFTTrainingArguments):
    output_dir: str | None = field(default="output/mllm_grounding")
    yesno_eval_samples: int = field(default=0)  # grounding answers are boxes, not yes/no


def prepare_data(data_args: GroundingDataArguments, output_dir: Path, seed: int, main_process: bool = True) -> str:
    """The training JSON: `data_path` as given, or freshly prepared from the annotation files (by the main
    process only; the caller makes the others wait)."""
    from mllm.data.grounding_prepare import PrepareOptions, prepare

    if data_args.data_path:
        return data_args.data_path
    if not data_args.rec and not data_args.flickr:
        raise ValueError("give --rec / --flickr annotation files or a prepared --data_path")
    out = output_dir / "grounding_train.json"
    if not main_process:
        return str(out)
    options = PrepareOptions(tasks=tuple(t.strip() for t in data_args.tasks.split(",") if t.strip()),
                             style=data_args.style, templates=data_args.templates, square_pad=data_args.square_pad,
                             padded_dir=output_dir / "padded_images", seed=seed)
    prepare(out, data_args.rec, data_args.flickr, Path(data_args.image_folder), options,
            Path(data_args.mix) if data_args.mix else None, data_args.mix_ratio if data_args.mix else 0.0)
    return str(out)


def train_grounding(model_args: ModelArguments, data_args: GroundingDataArguments,
                    training_args: SFTTrainingArguments, callbacks: list | None = None) -> dict:
    """Prepare (if needed), fine-tune, and score `eval_rec`; returns `sft.train`'s dict plus "grounding_eval"."""
    from mllm.train.sft import train

    output_dir = Path(training_args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with training_args.main_process_first(desc="grounding data"):
        data_path = prepare_data(data_args, output_dir, training_args.seed, training_args.process_index == 0)
    result = train(model_args, DataArguments(data_path=data_path, eval_data_path=data_args.eval_data_path,
                                             image_folder=data_args.image_folder,
                                             data_format=data_args.data_format if data_args.data_path else "auto",
                                             max_slice_nums=data_args.max_slice_nums,
                                             model_max_length=data_args.model_max_length),
                   training_args, callbacks)
    result["grounding_eval"] = None
    if data_args.eval_rec and result["model_dir"] and training_args.process_index == 0:
        from mllm.eval.grounding import evaluate_model, format_table

        shutil.rmtree(output_dir / "grounding_eval", ignore_errors=True)  # answers of an earlier model
        evaluation = evaluate_model(result["model_dir"], [Path(p) for p in data_args.eval_rec],
                                    output_dir / "grounding_eval", Path(data_args.image_folder), data_args.style,
                                    data_args.square_pad, limit=data_args.eval_limit, draw=8, quiet=True)
        print(format_table(evaluation))
        result["grounding_eval"] = {"splits": evaluation["splits"], "overall": evaluation["overall"]}
    return result
