"""mllm: a MiniCPM-V 2.6-compatible multimodal LLM — model, inference, evaluation and training."""

_PUBLIC = {
    "LLMConfig": "mllm.model.configuration",
    "MLLMConfig": "mllm.model.configuration",
    "SliceConfig": "mllm.model.configuration",
    "VisionConfig": "mllm.model.configuration",
    "MLLMModel": "mllm.model.modeling_mllm",
}


def __getattr__(name):
    # Imported on first use: torch and transformers are slow to import, and `mllm --help` needs neither.
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'mllm' has no attribute {name!r}")


__all__ = sorted(_PUBLIC)
