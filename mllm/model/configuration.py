"""Configuration of the MiniCPM-V 2.6-style MLLM.

In memory the config is typed and nested: `MLLMConfig.llm` (Qwen2-style decoder), `.vision` (SigLIP NaViT),
`.slice` (image slicing). On disk it is the MiniCPM-V 2.6 `config.json` layout: the LLM keys sit flat at the
top level next to the multimodal keys, with `vision_config` and `slice_config` as nested dicts. So a folder
written by `save_pretrained` loads in the reference code and a reference checkpoint loads here.

Unknown keys fail loudly, except the bookkeeping keys that Hugging Face tools write into every config.json.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from transformers import PreTrainedConfig
from huggingface_hub.dataclasses import strict


@strict
class LLMConfig(PreTrainedConfig):
    """Qwen2-style decoder. Field names and defaults follow the reference `LLMConfig` (facts sheet §1.3)."""

    model_type = "llm"

    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 22016
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 32
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    use_sliding_window: bool = False
    sliding_window: int | None = 4096
    max_window_layers: int = 28
    attention_dropout: float | int = 0.0
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must divide by num_attention_heads")
        super().__post_init__(**kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class VisionConfig:
    """SigLIP NaViT vision tower (facts sheet §1.2). The position table has (image_size // patch_size)**2 rows."""

    hidden_size: int = 1152
    image_size: int = 980
    intermediate_size: int = 4304
    num_attention_heads: int = 16
    num_hidden_layers: int = 27
    patch_size: int = 14
    num_channels: int = 3
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    model_type: str = "siglip"

    @property
    def num_patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class SliceConfig:
    """How an image is cut into a source view plus slices (facts sheet §6)."""

    patch_size: int = 14
    max_slice_nums: int = 9
    scale_resolution: int = 448
    model_type: str = "mllm"


# Keys that Hugging Face tooling writes into config.json files; they carry no model semantics here.
_BOOKKEEPING_KEYS = {
    "architectures", "auto_map", "torch_dtype", "dtype", "transformers_version", "_name_or_path", "version",
    "model_type", "keys_to_ignore_at_inference", "rope_scaling", "rope_parameters", "layer_types",
    "output_attentions", "output_hidden_states", "return_dict", "is_encoder_decoder", "tokenizer_class",
    "_attn_implementation_autoset", "attn_implementation", "num_labels", "id2label", "label2id",
}
# Options transformers' loaders pass along for downloading; a local folder or the local cache needs none of them.
_LOADER_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "gguf_file",
                  "_commit_hash", "trust_remote_code", "resume_download", "user_agent", "adapter_kwargs",
                  "key_mapping", "download_kwargs")
_LLM_FIELDS = [f.name for f in dataclasses.fields(LLMConfig) if f.name in LLMConfig.__annotations__]
# Sizes with no sensible default: a config without them would build a model of the wrong shape.
REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "vision_config")


def refuse_unimplemented(data: dict, source: str) -> None:
    """Keys this model would read but not honour: RoPE scaling, sliding windows, non-full attention layers."""
    problems = []
    if data.get("rope_scaling") not in (None, {}):
        problems.append(f"rope_scaling={data['rope_scaling']!r} (only plain RoPE is implemented)")
    rope_type = (data.get("rope_parameters") or {}).get("rope_type", "default")
    if rope_type != "default":
        problems.append(f"rope_parameters.rope_type={rope_type!r} (only 'default' is implemented)")
    if data.get("use_sliding_window"):
        problems.append("use_sliding_window=true (sliding-window attention is not implemented)")
    layer_types = data.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        problems.append(f"layer_types {sorted(set(layer_types))} (only full_attention is implemented)")
    if problems:
        raise ValueError(f"{source}: not implemented by this model: " + "; ".join(problems))


@strict(accept_kwargs=True)
class MLLMConfig(PreTrainedConfig):
    """The whole model: vision tower -> resampler -> LLM, plus the multimodal keys of MiniCPM-V 2.6.

    A transformers config (`AutoConfig` knows it as model_type `minicpmv` once `mllm` is imported), typed and
    nested in memory (`.llm`, `.vision`, `.slice`), flat on disk as the reference writes it: `from_dict` reads
    and `to_dict` writes the MiniCPM-V 2.6 config.json layout, refusing unknown and unimplemented keys.
    """

    model_type = "minicpmv"

    llm: LLMConfig | None = None
    vision: VisionConfig | None = None
    slice: SliceConfig | None = None
    query_num: int = 64  # resampler queries = <unk> placeholders per view
    image_size: int = 448  # informational, as in the reference
    drop_vision_last_layer: bool = True  # reference class default; the 2.6 checkpoint sets False
    batch_vision_input: bool = True
    use_image_id: bool = True
    vision_batch_size: int = 16
    slice_mode: bool = True
    # not a MiniCPM-V key (written only when True, so the reference's layout is unchanged): this model was trained
    # with the image after the question, and its prompts put it there (mllm.model.generation.build_chat_prompt)
    question_first: bool = False
    # not a MiniCPM-V key (written only when not "absolute"): "relative" places the resampler's keys at their place
    # in the image, scaled onto the grid of a square view (`slice.scale_resolution / patch_size` cells a side),
    # instead of at their absolute patch (row, column); mllm.model.resampler says why
    resampler_positions: str = "absolute"
    # not a MiniCPM-V key (written only when above 0): transformer layers over the resampler's Q tokens of a view
    resampler_query_layers: int = 0

    def __post_init__(self, **kwargs):
        self.llm = self.llm if self.llm is not None else LLMConfig()
        self.vision = self.vision if self.vision is not None else VisionConfig()
        self.slice = self.slice if self.slice is not None else SliceConfig()
        if not self.batch_vision_input:
            raise ValueError("batch_vision_input must be True: only the patch-strip pixel layout is supported")
        if self.resampler_positions not in ("absolute", "relative"):
            raise ValueError(f"resampler_positions must be 'absolute' or 'relative', got {self.resampler_positions!r}")
        if not isinstance(self.resampler_query_layers, int) or self.resampler_query_layers < 0:
            raise ValueError(f"resampler_query_layers must be a whole number >= 0, "
                             f"got {self.resampler_query_layers!r}")
        super().__post_init__(**kwargs)

    # ---- derived sizes -------------------------------------------------------------------------------------
    @property
    def patch_size(self) -> int:
        return self.vision.patch_size

    @property
    def resampler_heads(self) -> int:
        # The reference uses embed_dim // 128 heads (28 for a 3584-wide LLM).
        return max(1, self.llm.hidden_size // 128)

    @property
    def resampler_relative_grid(self) -> int | None:
        """Cells a side of the grid the resampler's relative key positions use; None for absolute positions."""
        if self.resampler_positions == "absolute":
            return None
        return max(1, self.slice.scale_resolution // self.patch_size)

    @property
    def vision_layers_used(self) -> int:
        return self.vision.num_hidden_layers - (1 if self.drop_vision_last_layer else 0)

    # ---- what transformers' Trainer and DeepSpeed integration ask of a model config -----------------------------
    @property
    def hidden_size(self) -> int:
        return self.llm.hidden_size

    def get_text_config(self, *_, **__) -> LLMConfig:
        return self.llm

    def to_diff_dict(self) -> dict:
        # Every key, always: a reader of config.json (ours or the reference's) needs the sizes spelled out.
        return self.to_dict()

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    # ---- serialization (flat MiniCPM-V layout) ---------------------------------------------------------------
    def to_dict(self) -> dict:
        out = {"architectures": ["MLLMModel"], "model_type": self.model_type}
        for name in _LLM_FIELDS:
            out[name] = getattr(self.llm, name)
        for name in ("query_num", "image_size", "drop_vision_last_layer", "batch_vision_input", "use_image_id",
                     "vision_batch_size", "slice_mode"):
            out[name] = getattr(self, name)
        out["vision_config"] = dataclasses.asdict(self.vision)
        out["slice_config"] = dataclasses.asdict(self.slice)
        out["patch_size"] = self.patch_size
        if self.question_first:
            out["question_first"] = True
        if self.resampler_positions != "absolute":
            out["resampler_positions"] = self.resampler_positions
        if self.resampler_query_layers:
            out["resampler_query_layers"] = self.resampler_query_layers
        return out

    @classmethod
    def from_dict(cls, data: dict, source: str = "config", **kwargs):
        """Read the flat MiniCPM-V layout. transformers' loaders pass their own keyword arguments too:
        `return_unused_kwargs`, `attn_implementation`, `dtype`, `name_or_path` are honoured, others returned."""
        return_unused = kwargs.pop("return_unused_kwargs", False)
        for key in ("_from_auto", "_from_pipeline"):
            kwargs.pop(key, None)
        attn_implementation = kwargs.pop("attn_implementation", None)
        name_or_path = kwargs.pop("name_or_path", None)
        kwargs.pop("torch_dtype", None)
        kwargs.pop("dtype", None)
        config = cls._from_flat(dict(data), source)
        if attn_implementation is not None:
            config._attn_implementation = attn_implementation
        if name_or_path is not None:
            config._name_or_path = name_or_path
        for key in [k for k in kwargs if hasattr(config, k)]:
            setattr(config, key, kwargs.pop(key))
        return (config, kwargs) if return_unused else config

    @classmethod
    def _from_flat(cls, data: dict, source: str) -> "MLLMConfig":
        missing = [k for k in REQUIRED_KEYS if k not in data]
        if missing:
            raise ValueError(f"{source}: missing required key(s) {missing}")
        refuse_unimplemented(data, source)
        rope = data.pop("rope_parameters", None) or {}
        if "rope_theta" not in data and "rope_theta" in rope:
            data["rope_theta"] = rope["rope_theta"]
        llm_kwargs = {k: data.pop(k) for k in list(data) if k in _LLM_FIELDS}
        vision = data.pop("vision_config", None) or {}
        slice_ = data.pop("slice_config", None) or {"max_slice_nums": 1}
        data.pop("patch_size", None)  # derived from vision_config
        data.pop("slice_mode", None)  # forced True, as in the reference
        top = {f.name for f in dataclasses.fields(cls)} - {"llm", "vision", "slice"}
        mm_kwargs = {k: data.pop(k) for k in list(data) if k in top}
        mm_kwargs.pop("model_type", None)
        unknown = sorted(k for k in data if k not in _BOOKKEEPING_KEYS)
        if unknown:
            raise ValueError(f"{source}: unknown config keys {unknown}")
        return cls(
            llm=LLMConfig(**llm_kwargs),
            vision=_typed(VisionConfig, vision, f"{source}: vision_config"),
            slice=_typed(SliceConfig, slice_, f"{source}: slice_config"),
            **mm_kwargs,
        )

    def save(self, folder: str | os.PathLike) -> None:
        """config.json, written atomically."""
        path = Path(folder) / "config.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(self.to_json_string())
        os.replace(tmp, path)

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> None:
        if push_to_hub:
            raise ValueError("push_to_hub is not supported: this project never talks to a hub")
        self.save(save_directory)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, **kwargs):
        """config.json of a model folder, or of a hub id found in the local Hugging Face cache."""
        from mllm.model.checkpoint import resolve_model_dir

        for key in _LOADER_KWARGS:  # transformers' download options; nothing is ever downloaded here
            kwargs.pop(key, None)
        subfolder = kwargs.pop("subfolder", "") or ""
        path = resolve_model_dir(folder) / subfolder / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no config.json in the model folder")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from err
        return cls.from_dict(data, source=str(path), **kwargs)

    @classmethod
    def from_preset(cls, name: str) -> "MLLMConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return PRESETS[name]()


def _typed(kind, data: dict, source: str):
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(k for k in data if k not in known and k not in _BOOKKEEPING_KEYS)
    if unknown:
        raise ValueError(f"{source}: unknown keys {unknown}")
    return kind(**{k: v for k, v in data.items() if k in known})


def minicpmv_26() -> MLLMConfig:
    """The real MiniCPM-V 2.6 sizes (facts sheet §1): 8,099,175,152 parameters."""
    return MLLMConfig(
        llm=LLMConfig(
            vocab_size=151666, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
            num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6,
            rope_theta=1_000_000.0, tie_word_embeddings=False, sliding_window=131072, max_window_layers=28,
            bos_token_id=151643, eos_token_id=151645,
        ),
        vision=VisionConfig(),
        slice=SliceConfig(patch_size=14, max_slice_nums=9, scale_resolution=448),
        query_num=64,
        drop_vision_last_layer=False,
    )


def tiny() -> MLLMConfig:
    """A few million parameters, trainable from scratch on a 2-core CPU (see tiny_model_notes.md).

    Small views (scale_resolution 112 -> 8x8 patches of 14 px) keep the vision sequence short; slicing still
    happens for images larger than 112x112. The vocabulary matches the project's own BPE tokenizer.
    """
    return MLLMConfig(
        llm=LLMConfig(
            vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=10000.0,
            tie_word_embeddings=False, sliding_window=4096, max_window_layers=4,
        ),
        vision=VisionConfig(hidden_size=128, image_size=224, intermediate_size=512, num_attention_heads=4,
                            num_hidden_layers=3, patch_size=14),
        slice=SliceConfig(patch_size=14, max_slice_nums=4, scale_resolution=112),
        query_num=16,
        image_size=112,
        drop_vision_last_layer=False,
        vision_batch_size=64,
    )


PRESETS = {"minicpmv-2.6": minicpmv_26, "tiny": tiny}
