"""oneDNN-packed linear layers: same products as `F.linear`, never stale, never on a path that needs gradients."""

import copy

import pytest
import torch
import torch.nn.functional as F

import mllm.model.cpu_linear as cpu_linear
from mllm.model.cpu_linear import pack_linears, packing_available

pytestmark = pytest.mark.skipif(not packing_available(), reason="this torch build has no oneDNN linear ops")


@pytest.fixture
def packs(monkeypatch):
    """Counts the weights packed (the oneDNN reorder runs once per weight, and again only after it changed)."""
    calls = []
    real = cpu_linear._pack

    def counting(weight):
        calls.append(weight.shape)
        return real(weight)

    monkeypatch.setattr(cpu_linear, "_pack", counting)
    return calls


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_products_equal_f_linear(packs, dtype, tol, bias):
    torch.manual_seed(0)
    layer = torch.nn.Linear(96, 160, bias=bias).to(dtype)
    x = torch.randn(3, 7, 96, dtype=dtype)  # 21 rows, a 3-d input as the models give it
    packed = cpu_linear.packable(dtype)  # bf16: only where oneDNN has bf16 kernels (not on an AVX2-only CPU)
    with torch.inference_mode():
        want = F.linear(x, layer.weight, layer.bias)
        assert pack_linears(layer) == int(packed)
        got = layer(x)
    assert got.shape == (3, 7, 160) and got.dtype == dtype
    assert torch.allclose(got.float(), want.float(), rtol=tol, atol=tol)
    assert packs == ([(160, 96)] if packed else [])


def test_bf16_layers_keep_f_linear_where_onednn_has_no_bf16_kernels(packs, monkeypatch):
    """On a CPU with AVX2 alone oneDNN's reorder refuses bf16 weights ("bf16 path needs the cpu support ..."):
    `mllm answer --dtype bfloat16` crashed there. Such layers are left to `F.linear`; float32 ones still pack."""
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 48).bfloat16(), torch.nn.Linear(48, 16))
    assert pack_linears(model) == 1  # the float32 layer only
    x = torch.randn(5, 32, dtype=torch.bfloat16)
    with torch.inference_mode():
        hidden = model[0](x)
        assert torch.equal(hidden, F.linear(x, model[0].weight, model[0].bias))
        model[1](hidden.float())
    assert packs == [(16, 48)]


def test_a_single_row_and_a_training_step_take_f_linear(packs):
    torch.manual_seed(0)
    layer = torch.nn.Linear(32, 48)
    pack_linears(layer)
    row = torch.randn(1, 1, 32)
    with torch.inference_mode():
        assert torch.equal(layer(row), F.linear(row, layer.weight, layer.bias))
    x = torch.randn(4, 32)
    out = layer(x)  # gradients on: the plain product, and backward works
    assert torch.equal(out, F.linear(x, layer.weight, layer.bias))
    out.square().sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    assert packs == []


def test_a_weight_changed_in_place_is_packed_again(packs):
    torch.manual_seed(0)
    layer = torch.nn.Linear(32, 48)
    pack_linears(layer)
    x = torch.randn(5, 32)
    with torch.inference_mode():
        layer(x)
        layer(x)
        assert len(packs) == 1  # packed once, reused
        new = torch.nn.Linear(32, 48)
        layer.load_state_dict(new.state_dict())  # copies in place: same storage, a new version
        got = layer(x)
    assert len(packs) == 2
    assert torch.allclose(got, F.linear(x, new.weight, new.bias), rtol=2e-5, atol=2e-5)


def test_names_kept_and_large_models_left_alone():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    keys = list(model.state_dict())
    assert pack_linears(model, max_bytes=10) == 0  # 352 bytes of weights > 10: not packed
    assert "forward" not in model[0].__dict__
    assert pack_linears(model) == 2
    assert pack_linears(model) == 0  # already routed
    assert list(model.state_dict()) == keys


def test_a_deep_copy_computes_with_its_own_weights():
    """A copied model (a frozen reference policy, say) must not keep using the original's layers."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 8))
    pack_linears(model)
    x = torch.randn(4, 16)
    with torch.inference_mode():
        before = model(x)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin[1].weight.mul_(2)
    with torch.inference_mode():
        assert torch.allclose(model(x), before)
        assert torch.allclose(twin(x), F.linear(twin[0](x), twin[1].weight, twin[1].bias), rtol=2e-5, atol=2e-5)
        assert not torch.allclose(twin(x), before)
