"""Give copied base stages' model folders a resampler with `resampler_query_layers` layers (freshly initialised;
`align` replaces the whole resampler anyway), so that a course run can reuse stages trained without them.

    mkdir -p runs/course17/base && cp -r runs/course16/world runs/course17/
    for s in init phase0 read settle ground; do cp -r runs/course16/base/$s runs/course17/base/; done
    .venv/bin/python docs/probes/add_query_layers.py 1 runs/course17/base/init runs/course17/base/phase0 \
        runs/course17/base/read/model runs/course17/base/settle/model runs/course17/base/ground/model
    nohup .venv/bin/python docs/probes/course_run.py out=runs/course17 stage=base >> runs/course17.log 2>&1 &

Every other tensor is copied as it is (checked: the only missing names are the new layers').
"""
import sys
from pathlib import Path

import torch

from mllm.model.configuration import MLLMConfig
from mllm.model.modeling_mllm import MLLMModel
from mllm.model.tokenization import load_tokenizer

if __name__ == "__main__":
    layers = int(sys.argv[1])
    for folder in map(Path, sys.argv[2:]):
        old = MLLMModel.from_pretrained(folder)
        config = MLLMConfig.from_pretrained(folder)
        config.resampler_query_layers = layers
        torch.manual_seed(0)
        new = MLLMModel(config)
        result = new.load_state_dict(old.state_dict(), strict=False)
        if result.unexpected_keys or not all("query_layers" in k for k in result.missing_keys):
            sys.exit(f"{folder}: unexpected {result.unexpected_keys}, missing {result.missing_keys}")
        new.save_pretrained(folder, tokenizer=load_tokenizer(folder))
        print(f"{folder}: {len(result.missing_keys)} new tensors, resampler_query_layers {layers}")
