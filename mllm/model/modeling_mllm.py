"""The multimodal model: vision tower -> resampler -> fuse into text embeddings -> LLM.

    pixel_values (patch strips per view) --vpm--> [V, N, Dv] --resampler--> [V, Q, D]
    input_ids --embed_tokens--> [B, T, D]; the Q placeholder positions of each view (image_bound) are
    overwritten by that view's Q vectors (the exercise's `get_vllm_embedding`) --llm--> logits [B, T, vocab]

Design choices:
- Composition: `MLLMModel` holds `vpm`, `resampler` and `llm`; nothing inherits from a combined base class.
  Freezing is explicit (`set_trainable(vision=..., resampler=..., llm=...)`).
- Names and layouts are MiniCPM-V 2.6's: state-dict prefixes `vpm.`, `resampler.`, `llm.`; inputs `input_ids`,
  `pixel_values` (per sample, a list of [3, 14, N*14] strips), `tgt_sizes` ((rows, cols) per view) and
  `image_bound` ([start, end) pairs per sample), so reference checkpoints load unchanged.
- A transformers `PreTrainedModel` (config class `MLLMConfig`, model_type `minicpmv`): `from_pretrained` is
  transformers' own (meta-device initialisation, `dtype=`, `device_map=`), wrapped in this project's checks;
  `import mllm` registers it with `AutoModel`, `AutoModelForCausalLM` and `AutoModelForImageTextToText`.
- Weights are read and written through safetensors only (`checkpoint.py`); saves are atomic.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init

from mllm.model import checkpoint
from mllm.model.configuration import MLLMConfig
from mllm.model.llm import LLMForCausalLM
from mllm.model.resampler import Resampler, sincos_2d
from mllm.model.vision import SiglipVisionTransformer, pack_patch_strips


class ImageTokenMismatch(ValueError):
    """The placeholder positions of a sample do not match the number of vision tokens given for it."""


class MLLMModel(PreTrainedModel):
    config_class = MLLMConfig
    config: MLLMConfig
    base_model_prefix = "mllm"  # no state-dict key starts with it: transformers never renames our keys
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LLMDecoderLayer", "SiglipEncoderLayer", "Resampler"]
    _supports_sdpa = True
    _supports_flash_attn = True

    def __init__(self, config: MLLMConfig):
        super().__init__(config)
        attention = config._attn_implementation or "sdpa"
        config.llm._attn_implementation = attention
        self.llm = LLMForCausalLM(config.llm)
        # the vision tower has sdpa and eager; with flash-attn for the LLM it runs sdpa (short, unpadded views)
        self.vpm = SiglipVisionTransformer(config.vision, num_layers=config.vision_layers_used,
                                           attn_implementation="sdpa" if attention == "flash_attention_2" else attention)
        grid = config.vision.num_patches_per_side
        self.resampler = Resampler(
            num_queries=config.query_num,
            embed_dim=config.llm.hidden_size,
            num_heads=config.resampler_heads,
            kv_dim=config.vision.hidden_size,
            max_size=(grid, grid),
            relative_grid=config.resampler_relative_grid,
            query_layers=config.resampler_query_layers,
        )
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Vision and resampler modules keep the initialisation their own constructors gave them; what a
        meta-device load leaves empty -- the resampler's non-persistent position table -- is recomputed here
        (the LLM, a PreTrainedModel of its own, does the same for its rotary frequencies)."""
        if isinstance(module, Resampler) and not module.pos_embed.is_meta and module.pos_embed.numel():
            table = torch.from_numpy(sincos_2d(module.embed_dim, module.max_size))
            init.copy_(module.pos_embed, table.to(module.pos_embed.dtype))

    def set_trainable(self, vision: bool = True, resampler: bool = True, llm: bool = True) -> None:
        """Freeze or unfreeze each part explicitly (the exercise's tune_vision / tune_llm flags)."""
        for module, flag in ((self.vpm, vision), (self.resampler, resampler), (self.llm, llm)):
            module.requires_grad_(flag)

    def _activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                         every_n_layers: int = 1, offload: bool = False) -> None:
        """Activation checkpointing of every LLM and vision layer, non-reentrant unless asked otherwise; reached
        through transformers' own switch (`activation_checkpointing_enable`, the Trainer's
        `--activation_checkpointing`)."""
        if every_n_layers != 1:
            raise ValueError(f"every_n_layers={every_n_layers}: this model checkpoints every layer or none")
        kwargs = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        super()._activation_checkpointing_enable(kwargs, 1, offload)
        if not kwargs["use_reentrant"]:
            # transformers hooks the input embeddings to output requires_grad=True; with a frozen embedding that
            # output becomes a leaf the in-place image-feature scatter cannot write into. Only reentrant
            # checkpointing needs the hook.
            self.disable_input_require_grads()

    # ---- vision -> resampler --------------------------------------------------------------------------------
    def get_vision_embedding(self, pixel_values: list[torch.Tensor], tgt_sizes: torch.Tensor) -> torch.Tensor:
        """Views (a flat list of [3, 14, N*14] strips, tgt_sizes [V, 2]) -> resampled features [V, Q, D]."""
        chunk = self.config.vision_batch_size
        dtype = self.vpm.embeddings.patch_embedding.weight.dtype
        tgt_sizes = torch.as_tensor(tgt_sizes, dtype=torch.int32).reshape(-1, 2)
        outputs = []
        for start in range(0, len(pixel_values), chunk):
            strips = [p.to(device=self.device, dtype=dtype) for p in pixel_values[start : start + chunk]]
            sizes = tgt_sizes[start : start + chunk].to(self.device)
            packed, patch_mask = pack_patch_strips(strips)  # (V, 3, 14, L), (V, 1, N_max)
            features = self.vpm(packed, patch_mask, sizes)  # (V, N_max, Dv)
            outputs.append(self.resampler(features, sizes))  # (V, Q, D)
        return torch.cat(outputs, dim=0)

    # ---- fusion (the exercise's get_vllm_embedding) -----------------------------------------------------------
    def get_vllm_embedding(
        self,
        input_ids: torch.Tensor,
        pixel_values: list[list[torch.Tensor]] | None = None,
        tgt_sizes: list[torch.Tensor] | None = None,
        image_bound: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Text embeddings [B, T, D] with every placeholder span replaced by its view's Q vision vectors."""
        embeds = self.llm.get_input_embeddings()(input_ids)  # (B, T, D)
        batch = input_ids.shape[0]
        pixel_values = pixel_values or [[] for _ in range(batch)]
        tgt_sizes = tgt_sizes if tgt_sizes is not None else [None] * batch
        image_bound = image_bound if image_bound is not None else [None] * batch
        if not (len(pixel_values) == len(tgt_sizes) == len(image_bound) == batch):
            raise ValueError(
                f"pixel_values ({len(pixel_values)}), tgt_sizes ({len(tgt_sizes)}) and image_bound "
                f"({len(image_bound)}) must each have one entry per sample ({batch})"
            )
        views = [list(p) for p in pixel_values]
        counts = [len(v) for v in views]
        if sum(counts) == 0:
            if self.training and any(p.requires_grad for p in self.vpm.parameters()):
                # Keep vision parameters in the graph for text-only batches, or DDP waits for their grads forever.
                embeds = embeds + 0.0 * self._dummy_vision_features().sum()
            return embeds

        sizes = torch.cat([torch.as_tensor(t, dtype=torch.int32).reshape(-1, 2) for t, n in zip(tgt_sizes, counts) if n])
        features = self.get_vision_embedding([p for v in views for p in v], sizes).to(embeds.dtype)  # (V, Q, D)
        query_num = features.shape[1]
        rows, cols = [], []
        for i in range(batch):
            bounds = image_bound[i]
            bounds = torch.as_tensor(bounds if bounds is not None else [], dtype=torch.long).reshape(-1, 2)
            spans = int((bounds[:, 1] - bounds[:, 0]).sum()) if len(bounds) else 0
            if spans != counts[i] * query_num or (len(bounds) and bool((bounds[:, 1] - bounds[:, 0] != query_num).any())):
                raise ImageTokenMismatch(
                    f"sample {i}: {counts[i]} view(s) give {counts[i] * query_num} vision tokens "
                    f"({query_num} each) but image_bound marks {len(bounds)} span(s) covering {spans} positions"
                )
            if counts[i] == 0:
                continue
            positions = torch.cat([torch.arange(int(s), int(e)) for s, e in bounds])
            if int(positions.max()) >= embeds.shape[1] or int(positions.min()) < 0:
                raise ImageTokenMismatch(f"sample {i}: image_bound {bounds.tolist()} outside the sequence of {embeds.shape[1]}")
            rows.append(torch.full_like(positions, i))
            cols.append(positions)
        # One out-of-place scatter: the views' vectors, in textual order, replace the placeholder positions.
        # (Out of place, so a frozen embedding's output -- a leaf under checkpointing hooks -- is never mutated.)
        index = (torch.cat(rows).to(embeds.device), torch.cat(cols).to(embeds.device))
        embeds = embeds.index_put(index, features.reshape(-1, embeds.shape[-1]))  # (V*Q, D) into (B, T, D)
        return embeds

    def _dummy_vision_features(self) -> torch.Tensor:
        patch = self.config.patch_size
        strip = torch.zeros(3, patch, patch, device=self.device, dtype=self.vpm.embeddings.patch_embedding.weight.dtype)
        return self.get_vision_embedding([strip], torch.tensor([[1, 1]], dtype=torch.int32))

    # ---- forward ------------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: list[list[torch.Tensor]] | None = None,
        tgt_sizes: list[torch.Tensor] | None = None,
        image_bound: list[torch.Tensor] | None = None,
        position_ids: torch.Tensor | None = None,
        **kwargs,
    ):
        """Logits for a batch; extra keyword arguments (cache, use_cache, output_attentions...) go to the LLM."""
        kwargs.pop("labels", None)  # labels are consumed by the trainers' losses, never by the model
        kwargs.pop("image_sizes", None)
        inputs_embeds = self.get_vllm_embedding(input_ids, pixel_values, tgt_sizes, image_bound)
        if position_ids is None and attention_mask is not None:
            # Count only real tokens, so left padding gives each sample the positions it would have alone.
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return self.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, **kwargs)

    # ---- generation (the exercise's `generate` and `chat`; the loop is transformers' GenerationMixin) ----------
    def generate(self, inputs: dict, tokenizer, decoding: str = "greedy", max_new_tokens: int = 256,
                 min_new_tokens: int = 0, **overrides) -> list[str]:
        """Answers for a processor batch; `overrides` adjust the decoding preset (temperature, num_beams...)."""
        from mllm.model.generation import GenerationSettings, generate

        settings = GenerationSettings(decoding, max_new_tokens, min_new_tokens, overrides)
        return generate(self, inputs, tokenizer, settings)

    def chat(self, image, msgs: list[dict], tokenizer, processor=None, sampling: bool = False,
             stream: bool = False, system_prompt: str | None = None, max_new_tokens: int = 256,
             min_new_tokens: int = 0, decoding: str | None = None, **overrides):
        """Answer the last user turn of `msgs` about `image` (a PIL image, a list of them, or None).

        Returns the answer string, or with `stream=True` an iterator over its pieces.
        """
        from mllm.model.generation import GenerationSettings, build_chat_prompt, generate, stream_generate
        from mllm.model.processing import processor_for

        processor = processor or processor_for(self, tokenizer)
        images = image if isinstance(image, (list, tuple)) else ([image] if image is not None else [])
        text, ordered = build_chat_prompt(msgs, tokenizer, images=images, system_prompt=system_prompt,
                                          question_first=self.config.question_first)
        inputs = processor([text], [ordered])
        settings = GenerationSettings(decoding or ("sample" if sampling else "greedy"), max_new_tokens,
                                      min_new_tokens, overrides)
        if stream:
            return stream_generate(self, inputs, tokenizer, settings)
        return generate(self, inputs, tokenizer, settings)[0]

    # ---- checkpoints --------------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, tokenizer=None, max_shard_bytes: int | None = None,
                        *, state_dict: dict | None = None, max_shard_size: int | str = "5GB",
                        safe_serialization: bool = True, is_main_process: bool = True, **_) -> None:
        """config.json + safetensors weights (+ the tokenizer files when given), each written atomically.

        Accepts transformers' keyword arguments (the Trainer passes `state_dict=`, gathered under ZeRO-3)."""
        if not safe_serialization:
            raise ValueError("weights are written as safetensors only (safe_serialization=False refused)")
        if not is_main_process:
            return
        if max_shard_bytes is None:
            from transformers.utils.hub import convert_file_size_to_int

            max_shard_bytes = convert_file_size_to_int(max_shard_size)
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        checkpoint.save_state_dict(self.state_dict() if state_dict is None else state_dict, folder,
                                   max_shard_bytes=max_shard_bytes)
        self.config.save(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(folder))

    @classmethod
    def from_config(cls, config: MLLMConfig | str, seed: int | None = None) -> "MLLMModel":
        """A randomly initialised model of a config or preset name."""
        config = MLLMConfig.from_preset(config) if isinstance(config, str) else config
        if seed is not None:
            torch.manual_seed(seed)
        return cls(config)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args,
                        dtype: torch.dtype | str | None = None, device: str | torch.device | None = None,
                        **kwargs) -> "MLLMModel":
        """Load a folder written by `save_pretrained`, a MiniCPM-V 2.6-layout checkpoint, or a hub id present in
        the local Hugging Face cache, through transformers' loader (meta-device init, `dtype=`, `device_map=`).

        Stricter than transformers alone: safetensors only (a pickle file is refused, never read), every tensor
        must exist with the model's shape (one error lists all problems), and no tensor may hold NaN/inf.
        """
        folder = checkpoint.resolve_model_dir(pretrained_model_name_or_path)
        checkpoint.weight_files(folder)  # refuses pickle-only folders and broken shard indexes, naming them
        config = kwargs.pop("config", None)
        if config is None:
            config = MLLMConfig.from_pretrained(folder)
        if kwargs.get("attn_implementation"):
            config._attn_implementation = kwargs["attn_implementation"]
        checkpoint.check_state_dict(expected_shapes(config), checkpoint.stored_shapes(folder), str(folder))
        if device is not None and "device_map" not in kwargs:
            kwargs["device_map"] = str(torch.device(device))
        kwargs.pop("trust_remote_code", None)  # never honoured: this class is the code
        model = super().from_pretrained(str(folder), *args, config=config, dtype=dtype, use_safetensors=True,
                                        **kwargs)
        checkpoint.check_finite(model.state_dict(), str(folder))
        return model


def expected_shapes(config: MLLMConfig) -> dict[str, torch.Size]:
    """Every state-dict key of a model of `config` with its shape, from a model built on the meta device."""
    with torch.device("meta"):
        model = MLLMModel(config)
    return {k: v.shape for k, v in model.state_dict().items()}
