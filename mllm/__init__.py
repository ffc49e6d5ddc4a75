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


def _started_as_cli() -> bool:
    # The `mllm` console script imports this package first; its verbs import the model themselves when they run,
    # so `mllm --help` stays fast. Everyone else gets the Auto classes registered at `import mllm`.
    import os
    import sys

    return bool(sys.argv) and os.path.basename(sys.argv[0]) == "mllm"


if not _started_as_cli():
    from mllm.model.auto import register as _register

    _register()
