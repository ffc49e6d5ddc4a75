"""Make the model a citizen of transformers' Auto classes: model_type `minicpmv` -> MLLMConfig, MLLMModel and
the processor, so `AutoModel.from_pretrained(folder)` loads a MiniCPM-V 2.6 folder with no remote code.

`import mllm` calls `register()`; registering twice is harmless.
"""

from __future__ import annotations


def register() -> None:
    from transformers import (AutoConfig, AutoImageProcessor, AutoModel, AutoModelForCausalLM,
                              AutoModelForImageTextToText, AutoProcessor)

    from mllm.model.configuration import MLLMConfig
    from mllm.model.image_processing import MLLMImageProcessor
    from mllm.model.modeling_mllm import MLLMModel
    from mllm.model.processing import MiniCPMVProcessor

    AutoConfig.register(MLLMConfig.model_type, MLLMConfig, exist_ok=True)
    for auto in (AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText):
        auto.register(MLLMConfig, MLLMModel, exist_ok=True)
    AutoImageProcessor.register(MLLMConfig, slow_image_processor_class=MLLMImageProcessor, exist_ok=True)
    AutoProcessor.register(MLLMConfig, MiniCPMVProcessor, exist_ok=True)
