"""Write a probe's weights as an ordinary checkpoint folder, so the product's own paths (`mllm answer`, `mllm eval`,
the course's evaluations) measure it: LLM from stage 1/3, vision tower and resampler from stage 2/3.

    .venv/bin/python docs/probes/export.py ckpt=runs/probe/s3a.pt [llm=runs/probe/s1q.pt] res=112 out=runs/probe/s3a_model
"""
import shutil
import sys
from pathlib import Path

import torch

from mllm.model.configuration import MLLMConfig
from mllm.model.modeling_mllm import MLLMModel
from mllm.model.tokenization import load_tokenizer

args = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
state = torch.load(args["ckpt"])
llm_state = state.get("llm") or torch.load(args["llm"])["llm"]
tok = load_tokenizer("mllm/assets/tiny-base")
config = MLLMConfig.from_preset("tiny")
config.llm.vocab_size = len(tok)
config.query_num = int(args.get("q", 36))
config.slice.max_slice_nums = 1
config.slice.scale_resolution = int(args.get("res", 112))
config.image_size = config.slice.scale_resolution
config.use_image_id = False
model = MLLMModel(config)
model.llm.load_state_dict(llm_state)
model.vpm.load_state_dict(state["vpm"])
model.resampler.load_state_dict(state["res"])
out = Path(args["out"])
model.save_pretrained(out)
for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    shutil.copy(Path("mllm/assets/tiny-base") / name, out / name)
print("wrote", out)
