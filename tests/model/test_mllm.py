"""The composite model: parameter count and names of the real preset, fusion, checkpoints."""

import json
import re

import pytest
import torch

from mllm.model.checkpoint import CheckpointError
from mllm.model.configuration import LLMConfig, MLLMConfig, SliceConfig, VisionConfig
from mllm.model.modeling_mllm import ImageTokenMismatch, MLLMModel


def small_config(**overrides) -> MLLMConfig:
    config = MLLMConfig(
        llm=LLMConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0),
        vision=VisionConfig(hidden_size=32, image_size=112, intermediate_size=64, num_attention_heads=2,
                            num_hidden_layers=2, patch_size=14),
        slice=SliceConfig(max_slice_nums=4, scale_resolution=56),
        query_num=4,
        drop_vision_last_layer=False,
    )
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def strip(h: int, w: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 14, h * w * 14, generator=g)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MLLMModel(small_config()).eval()


# ---- the real preset ---------------------------------------------------------------------------------------
def expected_minicpmv26_shapes() -> dict[str, tuple]:
    """The state-dict table of the facts sheet (§2), written out independently of the model code."""
    shapes = {"llm.model.embed_tokens.weight": (151666, 3584), "llm.model.norm.weight": (3584,),
              "llm.lm_head.weight": (151666, 3584)}
    for i in range(28):
        p = f"llm.model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (3584, 3584), p + "self_attn.q_proj.bias": (3584,),
            p + "self_attn.k_proj.weight": (512, 3584), p + "self_attn.k_proj.bias": (512,),
            p + "self_attn.v_proj.weight": (512, 3584), p + "self_attn.v_proj.bias": (512,),
            p + "self_attn.o_proj.weight": (3584, 3584),
            p + "mlp.gate_proj.weight": (18944, 3584), p + "mlp.up_proj.weight": (18944, 3584),
            p + "mlp.down_proj.weight": (3584, 18944),
            p + "input_layernorm.weight": (3584,), p + "post_attention_layernorm.weight": (3584,),
        })
    shapes.update({"vpm.embeddings.patch_embedding.weight": (1152, 3, 14, 14),
                   "vpm.embeddings.patch_embedding.bias": (1152,),
                   "vpm.embeddings.position_embedding.weight": (4900, 1152),
                   "vpm.post_layernorm.weight": (1152,), "vpm.post_layernorm.bias": (1152,)})
    for i in range(27):
        p = f"vpm.encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[p + f"self_attn.{proj}.weight"] = (1152, 1152)
            shapes[p + f"self_attn.{proj}.bias"] = (1152,)
        for norm in ("layer_norm1", "layer_norm2"):
            shapes[p + f"{norm}.weight"] = (1152,)
            shapes[p + f"{norm}.bias"] = (1152,)
        shapes.update({p + "mlp.fc1.weight": (4304, 1152), p + "mlp.fc1.bias": (4304,),
                       p + "mlp.fc2.weight": (1152, 4304), p + "mlp.fc2.bias": (1152,)})
    shapes.update({"resampler.query": (64, 3584), "resampler.kv_proj.weight": (3584, 1152),
                   "resampler.attn.in_proj_weight": (10752, 3584), "resampler.attn.in_proj_bias": (10752,),
                   "resampler.attn.out_proj.weight": (3584, 3584), "resampler.attn.out_proj.bias": (3584,),
                   "resampler.proj": (3584, 3584)})
    for norm in ("ln_q", "ln_kv", "ln_post"):
        shapes[f"resampler.{norm}.weight"] = (3584,)
        shapes[f"resampler.{norm}.bias"] = (3584,)
    return shapes


def test_minicpmv26_preset_parameter_count_and_names():
    with torch.device("meta"):
        model = MLLMModel(MLLMConfig.from_preset("minicpmv-2.6"))
    assert sum(p.numel() for p in model.parameters()) == 8_099_175_152
    assert sum(p.numel() for p in model.vpm.parameters()) == 417_792_240
    assert sum(p.numel() for p in model.resampler.parameters()) == 68_619_264
    found = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert found == expected_minicpmv26_shapes()


def test_drop_vision_last_layer_builds_one_layer_less():
    with torch.device("meta"):
        dropped = MLLMModel(small_config(drop_vision_last_layer=True))
    assert len(dropped.vpm.encoder.layers) == 1


# ---- fusion ------------------------------------------------------------------------------------------------
def test_fusion_replaces_exactly_the_placeholder_spans(model):
    q = model.config.query_num
    ids = torch.randint(5, 90, (2, 20))
    views = [[strip(2, 3, 0), strip(3, 2, 1)], [strip(2, 2, 2)]]
    sizes = [torch.tensor([[2, 3], [3, 2]]), torch.tensor([[2, 2]])]
    bounds = [torch.tensor([[2, 2 + q], [10, 10 + q]]), torch.tensor([[5, 5 + q]])]
    with torch.no_grad():
        fused = model.get_vllm_embedding(ids, views, sizes, bounds)
        text = model.llm.get_input_embeddings()(ids)
        vision = model.get_vision_embedding([v for vs in views for v in vs], torch.cat(sizes))
    assert torch.equal(fused[0, 2:6], vision[0])
    assert torch.equal(fused[0, 10:14], vision[1])
    assert torch.equal(fused[1, 5:9], vision[2])
    untouched = torch.ones(2, 20, dtype=torch.bool)
    untouched[0, 2:6] = untouched[0, 10:14] = untouched[1, 5:9] = False
    assert torch.equal(fused[untouched], text[untouched])


def test_fusion_batched_equals_each_sample_alone(model):
    q = model.config.query_num
    ids = torch.randint(5, 90, (2, 12))
    views = [[strip(3, 4, 3)], [strip(1, 2, 4), strip(2, 2, 5)]]
    sizes = [torch.tensor([[3, 4]]), torch.tensor([[1, 2], [2, 2]])]
    bounds = [torch.tensor([[1, 1 + q]]), torch.tensor([[0, q], [6, 6 + q]])]
    with torch.no_grad():
        both = model(ids, pixel_values=views, tgt_sizes=sizes, image_bound=bounds).logits
        for i in range(2):
            alone = model(ids[i : i + 1], pixel_values=[views[i]], tgt_sizes=[sizes[i]], image_bound=[bounds[i]]).logits
            assert (both[i] - alone[0]).abs().max() < 1e-5


def test_fusion_count_mismatch_is_a_clear_error(model):
    q = model.config.query_num
    ids = torch.randint(5, 90, (1, 16))
    with pytest.raises(ImageTokenMismatch, match="sample 0: 2 view"):
        model.get_vllm_embedding(ids, [[strip(2, 2, 0), strip(2, 2, 1)]], [torch.tensor([[2, 2], [2, 2]])],
                                 [torch.tensor([[1, 1 + q]])])
    with pytest.raises(ImageTokenMismatch):
        model.get_vllm_embedding(ids, [[strip(2, 2, 0)]], [torch.tensor([[2, 2]])], [torch.tensor([[1, 1 + q + 1]])])


def test_text_only_batch_and_padding(model):
    ids = torch.randint(5, 90, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        alone = model(ids[1:, 3:]).logits
    assert logits.shape == (2, 7, 97)
    assert (logits[1, 3:] - alone[0]).abs().max() < 1e-5


def test_text_only_training_batch_keeps_vision_in_graph():
    torch.manual_seed(0)
    model = MLLMModel(small_config()).train()
    model(torch.randint(5, 90, (1, 5))).logits.sum().backward()
    assert all(p.grad is not None for p in model.vpm.parameters())


def test_set_trainable_freezes_parts():
    model = MLLMModel(small_config())
    model.set_trainable(vision=False, resampler=True, llm=False)
    assert not any(p.requires_grad for p in model.vpm.parameters())
    assert all(p.requires_grad for p in model.resampler.parameters())
    assert not any(p.requires_grad for p in model.llm.parameters())


# ---- checkpoints -------------------------------------------------------------------------------------------
def test_save_load_round_trip_is_bit_exact(tmp_path, model):
    model.save_pretrained(tmp_path / "ckpt")
    loaded = MLLMModel.from_pretrained(tmp_path / "ckpt").eval()
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(5, 90, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    # Buffers that are not in the checkpoint are rebuilt identically.
    assert all(torch.equal(x, y) for x, y in zip(model.buffers(), loaded.buffers()))


def test_sharded_minicpmv_layout_loads(tmp_path, model):
    folder = tmp_path / "minicpmv"
    model.save_pretrained(folder, max_shard_bytes=20_000)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    config = json.loads((folder / "config.json").read_text())
    config.update({"architectures": ["MiniCPMV"], "auto_map": {"AutoModel": "modeling_minicpmv.MiniCPMV"},
                   "torch_dtype": "bfloat16", "version": 2.6, "transformers_version": "4.40.0"})
    (folder / "config.json").write_text(json.dumps(config))
    loaded = MLLMModel.from_pretrained(folder)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())


def test_mismatched_checkpoint_lists_every_problem(tmp_path, model):
    from safetensors.torch import save_file

    folder = tmp_path / "bad"
    model.save_pretrained(folder)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    del state["resampler.query"]
    state["vpm.extra.weight"] = torch.zeros(2)
    state["llm.model.norm.weight"] = torch.zeros(5)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        MLLMModel.from_pretrained(folder)
    message = str(err.value)
    assert "1 missing" in message and "resampler.query" in message
    assert "1 unexpected" in message and "vpm.extra.weight" in message
    assert re.search(r"llm\.model\.norm\.weight: checkpoint \(5,\) vs model \(64,\)", message)


def test_corrupted_or_pickled_checkpoint_is_refused(tmp_path, model):
    folder = tmp_path / "corrupt"
    model.save_pretrained(folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read safetensors"):
        MLLMModel.from_pretrained(folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pickle weight files are not loaded"):
        MLLMModel.from_pretrained(folder)


def test_unknown_config_key_fails_loudly(tmp_path, model):
    model.save_pretrained(tmp_path / "c")
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    config["qery_num"] = 4
    (tmp_path / "c" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unknown config keys \\['qery_num'\\]"):
        MLLMModel.from_pretrained(tmp_path / "c")


def test_resampler_positions_are_written_only_when_relative_and_reach_the_resampler():
    plain = small_config()
    assert "resampler_positions" not in plain.to_dict() and MLLMModel(plain).resampler.relative_grid is None
    relative = small_config(resampler_positions="relative")
    data = relative.to_dict()
    assert data["resampler_positions"] == "relative"
    assert MLLMConfig.from_dict(data).resampler_positions == "relative"
    # the grid of a square view: scale_resolution 56 / patch 14 = 4 cells a side
    assert relative.resampler_relative_grid == 4 and MLLMModel(relative).resampler.relative_grid == 4
    data["resampler_positions"] = "learned"
    with pytest.raises(ValueError, match="resampler_positions must be 'absolute' or 'relative', got 'learned'"):
        MLLMConfig.from_dict(data)


def test_resampler_query_layers_are_written_only_when_asked_and_load_back(tmp_path):
    assert "resampler_query_layers" not in small_config().to_dict()
    assert not any("query_layers" in n for n in MLLMModel(small_config()).state_dict())
    model = MLLMModel(small_config(resampler_query_layers=1))
    assert model.config.to_dict()["resampler_query_layers"] == 1
    model.save_pretrained(tmp_path / "m")
    loaded = MLLMModel.from_pretrained(tmp_path / "m")
    names = [n for n in loaded.state_dict() if n.startswith("resampler.query_layers.0.")]
    assert "resampler.query_layers.0.linear1.weight" in names
    assert all(torch.equal(loaded.state_dict()[n], model.state_dict()[n]) for n in names)
    with pytest.raises(ValueError, match="resampler_query_layers must be a whole number >= 0, got -1"):
        small_config(resampler_query_layers=-1).__post_init__()


def test_question_first_is_written_only_when_set_and_read_back():
    plain = small_config().to_dict()
    assert "question_first" not in plain  # the MiniCPM-V layout unchanged for every other model
    assert MLLMConfig.from_dict(plain).question_first is False
    asked = small_config(question_first=True).to_dict()
    assert asked["question_first"] is True and MLLMConfig.from_dict(asked).question_first is True
