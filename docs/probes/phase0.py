"""Phase 0 (the vision side's pretraining on the world's labels, `mllm.course.base.pretrain`) alone, on one
thread, into a folder that `pixels.py phase0=` takes: to measure a change of its targets without a whole course.

    .venv/bin/python docs/probes/phase0.py base=runs/course7/base out=runs/probe/pc0/phase0 [steps=3000]
        (pc0: commit 559f5f3, whose phase 0 also taught each patch its shape's count in the scene; removed
        after it, as from pixels count stayed at chance: docs/probes/README.md, stop 37)
"""
import json
import sys
from pathlib import Path

import torch

from mllm.course.base import pretrain
from mllm.model.modeling_mllm import MLLMModel
from mllm.model.tokenization import load_tokenizer

args = dict(a.split("=", 1) for a in sys.argv[1:])
torch.set_num_threads(1)
base, out = Path(args["base"]), Path(args["out"])
model, tokenizer = MLLMModel.from_pretrained(base / "init"), load_tokenizer(base / "init")
log = pretrain(model, base.parent / "world", steps=int(args.get("steps", 3000)), batch_size=64, lr=3e-3, seed=0)
model.save_pretrained(out, tokenizer=tokenizer)
(out / "vision_pretrain_log.json").write_text(json.dumps(log))
