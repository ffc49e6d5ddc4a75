"""The model as a transformers citizen: Auto classes after `import mllm`, a folder built from transformers' own
Qwen2 and Idefics2 modules loaded through them (logits within 1e-4), bit-exact and sharded round trips, dtype and
device_map, meta-device loading without a second copy in RAM, hub ids from the local cache only."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText,
                          AutoProcessor, Qwen2ForCausalLM)
from transformers.models.idefics2.configuration_idefics2 import Idefics2VisionConfig
from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionTransformer

import mllm  # noqa: F401  (registers the Auto classes)
from mllm.model.checkpoint import CheckpointError, ModelNotFoundError, resolve_model_dir
from mllm.model.configuration import MLLMConfig
from mllm.model.modeling_mllm import MLLMModel
from mllm.model.processing import MLLMProcessor
from mllm.model.vision import pack_patch_strips
from tests.model.test_llm import qwen2_config
from tests.model.test_mllm import small_config
from tests.model.test_vision import random_view, to_strip

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ref_folder(tmp_path_factory, tiny_checkpoint):
    """A MiniCPM-V-layout folder whose LLM and vision weights come from transformers' Qwen2ForCausalLM and
    Idefics2VisionTransformer (random), with the reference's remote-code `auto_map` in config.json and
    preprocessor_config.json, and the tiny checkpoint's tokenizer."""
    torch.manual_seed(0)
    config = small_config()
    config.llm.vocab_size = 300  # the tokenizer of tiny_checkpoint
    qwen = Qwen2ForCausalLM(qwen2_config(config.llm)).eval()
    vision = Idefics2VisionTransformer(Idefics2VisionConfig(
        hidden_size=config.vision.hidden_size, image_size=config.vision.image_size,
        intermediate_size=config.vision.intermediate_size, num_attention_heads=config.vision.num_attention_heads,
        num_hidden_layers=config.vision.num_hidden_layers, patch_size=config.vision.patch_size)).eval()
    ours = MLLMModel(config)
    state = {f"llm.{k}": v for k, v in qwen.state_dict().items()}
    state |= {f"vpm.{k}": v for k, v in vision.state_dict().items()}
    state |= {k: v for k, v in ours.state_dict().items() if k.startswith("resampler.")}
    folder = tmp_path_factory.mktemp("ref")
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    data = config.to_dict()
    data["architectures"] = ["MiniCPMV"]
    data["auto_map"] = {"AutoConfig": "configuration_minicpm.MiniCPMVConfig",
                        "AutoModel": "modeling_minicpmv.MiniCPMV"}
    (folder / "config.json").write_text(json.dumps(data))
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "MiniCPMVImageProcessor", "processor_class": "MiniCPMVProcessor",
        "auto_map": {"AutoProcessor": "processing_minicpmv.MiniCPMVProcessor",
                     "AutoImageProcessor": "image_processing_minicpmv.MiniCPMVImageProcessor"},
        "max_slice_nums": 4, "scale_resolution": 56, "patch_size": 14}))
    for name in os.listdir(tiny_checkpoint):
        if name.startswith("tokenizer") or name.endswith(".jinja"):
            (folder / name).write_bytes((tiny_checkpoint / name).read_bytes())
    return {"folder": folder, "qwen": qwen, "vision": vision}


def test_auto_classes_load_the_reference_folder_without_remote_code(ref_folder):
    folder = ref_folder["folder"]
    config = AutoConfig.from_pretrained(folder)
    assert type(config) is MLLMConfig and config.model_type == "minicpmv" and config.query_num == 4
    for auto in (AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText):
        model = auto.from_pretrained(folder)
        assert type(model) is MLLMModel and not model.training
    processor = AutoProcessor.from_pretrained(folder)
    assert isinstance(processor, MLLMProcessor) and processor.query_num == 4
    assert processor.image_processor.max_slice_nums == 4 and processor.image_processor.scale_resolution == 56


def test_logits_through_auto_model_match_transformers_modules(ref_folder):
    model = AutoModel.from_pretrained(ref_folder["folder"]).eval()
    ids = torch.randint(1, 300, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model.llm(input_ids=ids).logits
        theirs = ref_folder["qwen"](input_ids=ids).logits
        assert (ours - theirs).abs().max().item() < 1e-4
        view = random_view(4, 6, seed=5)
        packed, mask = pack_patch_strips([to_strip(view)])
        got = model.vpm(packed, mask, torch.tensor([[4, 6]], dtype=torch.int32))
        expected = ref_folder["vision"](view[None], patch_attention_mask=torch.ones(1, 4, 6, dtype=torch.bool))
        assert (got - expected.last_hidden_state).abs().max().item() < 1e-4


def test_save_and_load_round_trip_is_bit_exact_single_and_sharded(tmp_path):
    torch.manual_seed(1)
    model = MLLMModel(small_config()).eval()
    for name, shard in (("single", "5GB"), ("sharded", 40_000)):
        model.save_pretrained(tmp_path / name, max_shard_size=shard)
        shards = sorted(p.name for p in (tmp_path / name).glob("*.safetensors"))
        assert (len(shards) > 1) == (name == "sharded"), shards
        loaded = AutoModel.from_pretrained(tmp_path / name)
        assert loaded.state_dict().keys() == model.state_dict().keys()
        for key, tensor in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], tensor), key
        # the non-persistent tables were rebuilt after the meta-device load
        assert torch.equal(loaded.resampler.pos_embed, model.resampler.pos_embed)
        assert torch.equal(loaded.llm.model.rotary_emb.inv_freq, model.llm.model.rotary_emb.inv_freq)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_dtype_and_device_map(tmp_path):
    torch.manual_seed(2)
    MLLMModel(small_config()).save_pretrained(tmp_path)
    model = AutoModel.from_pretrained(tmp_path, dtype=torch.bfloat16, device_map="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    auto = AutoModel.from_pretrained(tmp_path, device_map="auto")
    assert {p.device.type for p in auto.parameters()} == {"cpu"}
    assert MLLMModel.from_pretrained(tmp_path, dtype=torch.bfloat16, device="cpu").dtype == torch.bfloat16


def test_pickle_weights_are_refused_never_read(tmp_path):
    torch.manual_seed(2)
    MLLMModel(small_config()).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle weight files are not loaded"):
        AutoModel.from_pretrained(tmp_path)


def test_mis_shaped_checkpoint_lists_every_problem(tmp_path):
    torch.manual_seed(2)
    MLLMModel(small_config()).save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data["intermediate_size"] = 96
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"mis-shaped tensor.*\n.*mlp"):
        AutoModel.from_pretrained(tmp_path)


def test_hub_id_resolves_from_the_local_cache_only(tmp_path, monkeypatch):
    torch.manual_seed(2)
    cache = tmp_path / "hub"
    repo = cache / "models--someorg--tiny-mllm"
    snapshot = repo / "snapshots" / ("a" * 40)
    MLLMModel(small_config()).save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    assert resolve_model_dir("someorg/tiny-mllm") == snapshot
    model = MLLMModel.from_pretrained("someorg/tiny-mllm")
    assert model.config.query_num == 4
    with pytest.raises(ModelNotFoundError, match="not in the local Hugging Face cache"):
        resolve_model_dir("someorg/absent")
    with pytest.raises(ModelNotFoundError, match="no such model folder"):
        resolve_model_dir(tmp_path / "missing")


PEAK_RSS = r"""
import resource, sys, torch
import mllm
from transformers import AutoModel
torch.set_num_threads(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
model = AutoModel.from_pretrained(sys.argv[1])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(before, after, sum(p.numel() * p.element_size() for p in model.parameters()))
"""


def test_large_checkpoint_loads_without_a_second_copy_in_ram(tmp_path):
    """~240 MB of fp32 weights: peak RSS grows by about one copy (meta-device init, weights read into place)."""
    from mllm.model.configuration import LLMConfig, SliceConfig, VisionConfig

    config = MLLMConfig(llm=LLMConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                                      num_hidden_layers=6, num_attention_heads=12, num_key_value_heads=4),
                        vision=VisionConfig(hidden_size=64, image_size=112, intermediate_size=128,
                                            num_attention_heads=2, num_hidden_layers=1),
                        slice=SliceConfig(max_slice_nums=1, scale_resolution=56), query_num=4)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in MLLMModel(config).state_dict().items()}
    save_file({k: torch.full(s, 0.01) for k, s in shapes.items()}, str(tmp_path / "model.safetensors"))
    config.save(tmp_path)
    out = subprocess.run([sys.executable, "-c", PEAK_RSS, str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    before, after, size = map(int, out.stdout.split()[-3:])
    assert size > 200e6
    print(f"weights {size / 1e6:.0f} MB, peak RSS growth {(after - before) / 1e6:.0f} MB")
    assert after - before < 1.4 * size, (before, after, size)
