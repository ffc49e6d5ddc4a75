"""How linear layers compute for inference on the CPU: weights stored transposed for single rows
(`cpu_matmul_layout`), and products of several rows through oneDNN with weights packed once (`pack_linears`).

Why: on this project's machine (AMD EPYC, one thread) torch's `F.linear` goes to MKL, which multiplied float32
matrices of 3 or more rows at about 100 GFLOP/s; the same products through oneDNN, with the weight reordered once
into oneDNN's blocked layout, ran 2.0-2.5x faster (8 to 1,024 rows: batched decoding, prefill, the vision tower).
A single row (batch-1 decoding) streams the weight about as fast either way and keeps `F.linear` on the
transposed layout `cpu_matmul_layout` gives it. Each oneDNN call costs ~12 us however small the product, so
layers that read the same input (a module's `FUSABLE`: q/k/v, gate/up) are packed as one matrix and run as one
product, split after.

- Numerics: oneDNN sums in another order than MKL: outputs differ from `F.linear` by float32 rounding (~5e-6
  relative); greedy tokens are checked equal to transformers' in the tests and the benchmarks.
- Inference only: a call that needs gradients (training) takes `F.linear`, and a weight or bias changed in place
  since it was packed (`load_state_dict`, an optimizer step) is packed again before use, so a packed copy is
  never stale. Parameters and state-dict names are untouched.
- Memory: the packed copy doubles the bytes of the weights it covers; `pack_linears` leaves models whose linear
  weights exceed `max_bytes` alone (the shipped and benchmark models are far below the default 2 GiB; a real
  MiniCPM-V 2.6 is not, and keeps `F.linear`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def cpu_matmul_layout(llm: torch.nn.Module) -> int:
    """Store the float32 weights of the LLM's linear layers transposed in memory (shape unchanged), for inference
    on the CPU; returns how many were changed.

    `F.linear` multiplies by the weight's transpose; with an (in, out) memory layout that transpose is a plain
    row-major matrix and the matrix-vector products of decoding stream it at a higher bandwidth: decode measured
    1.36-1.40x faster at batch 1 and 1.06-1.12x at batch 8 (benchmarks/bench_decode.py). Products of two or more
    rows are bit-identical either way; a single row (batch-1 decoding) is summed in another order, differing in
    the last bits (~1e-6) with the same greedy tokens in every benchmark case. bf16 weights decode faster in the
    usual layout, so they are left as they are; a tied output layer (the embedding table) too. Saving still
    writes contiguous tensors of the usual layout.
    """
    tied = llm.get_input_embeddings().weight
    changed = 0
    for module in llm.modules():
        if isinstance(module, torch.nn.Linear) and module.weight.dtype == torch.float32 \
                and module.weight is not tied and module.weight.is_contiguous():
            module.weight.data = module.weight.data.t().contiguous().t()
            changed += 1
    return changed


def packing_available() -> bool:
    """Whether this torch build has the oneDNN linear ops (x86 CPU builds do)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") \
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_bf16_kernels() -> bool:
    """Whether oneDNN has bf16 kernels on this CPU (AVX-512 or AVX-NE-CONVERT), as PyTorch's own CPU bf16 paths
    ask it; without them (AVX2 alone) bf16 is emulated, and the reorder below refuses bf16 weights."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def packable(dtype: torch.dtype) -> bool:
    """float32 always; bf16 where `onednn_bf16_kernels`. Elsewhere (AVX2 alone) oneDNN's reorder refuses bf16
    weights ("bf16 path needs the cpu support ...") and bf16 layers keep `F.linear`."""
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and onednn_bf16_kernels()


def _pack(weight: torch.Tensor) -> torch.Tensor:
    # the batch-size hint only picks oneDNN's blocking; 8 measured as fast as any other for 3..1,024 rows
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 8)


def _takes_packed(x: torch.Tensor, linears: Sequence[torch.nn.Linear]) -> bool:
    """Whether the product of `x` with these layers can run on their packed weights."""
    weight = linears[0].weight
    if x.device.type != "cpu" or x.dtype != weight.dtype or x.numel() == x.shape[-1]:
        return False  # another device or dtype; or a single row, for which the transposed-layout GEMV is as fast
    return not (torch.is_grad_enabled() and (x.requires_grad or any(m.weight.requires_grad or (
        m.bias is not None and m.bias.requires_grad) for m in linears)))


def _version(linears: Sequence[torch.nn.Linear]) -> tuple:
    return tuple((t.data_ptr(), t._version, t.dtype) for m in linears for t in (m.weight, m.bias) if t is not None)


class LinearGroup:
    """x -> (linears[0](x), linears[1](x), ...): one oneDNN product on their packed, stacked weights where that is
    right, `F.linear` per layer everywhere else. The outputs are views of the one product's result.

    An object rather than a closure so that `copy.deepcopy` of a model points the copy's group at the copy's layers;
    the packed copy itself is never copied or pickled (it is rebuilt on first use).
    """

    def __init__(self, linears: Sequence[torch.nn.Linear], single: bool = False):
        self.linears, self.single = list(linears), single
        self.sizes = [m.out_features for m in self.linears]
        self.key = self.weight = self.bias = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "key": None, "weight": None, "bias": None}

    def __call__(self, x: torch.Tensor):
        if not _takes_packed(x, self.linears):
            outputs = tuple(F.linear(x, m.weight, m.bias) for m in self.linears)
        else:
            key = _version(self.linears)
            if self.key != key:  # first use, or a weight or bias changed since it was packed
                with torch.no_grad():
                    self.weight = _pack(torch.cat([m.weight for m in self.linears]))
                    self.bias = None if all(m.bias is None for m in self.linears) else torch.cat(
                        [m.bias if m.bias is not None else m.weight.new_zeros(m.out_features) for m in self.linears])
                self.key = key
            y = torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
            outputs = tuple(y.split(self.sizes, dim=-1))
        return outputs[0] if self.single else outputs


def pack_linears(model: torch.nn.Module, max_bytes: int = 2 * 2**30) -> int:
    """Route the CPU inference of the float32 (and, where `packable`, bf16) `nn.Linear` layers of `model` through
    oneDNN (packed lazily, on first use); a module's `FUSABLE` groups ({attribute: linear names}) become one product
    each, set as that attribute. Returns how many layers were routed (0 when oneDNN is missing or the weights exceed
    `max_bytes`)."""
    def eligible(m):
        return isinstance(m, torch.nn.Linear) and packable(m.weight.dtype) and m.weight.device.type == "cpu"

    if not packing_available():
        return 0
    linears = [m for m in model.modules() if eligible(m) and "forward" not in m.__dict__]
    total = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    if total > max_bytes or not linears:
        return 0
    for module in model.modules():
        for attribute, names in getattr(module, "FUSABLE", {}).items():
            group = [getattr(module, name) for name in names]
            if getattr(module, attribute, None) is None and all(eligible(m) for m in group) \
                    and len({(m.weight.dtype, m.in_features) for m in group}) == 1:
                setattr(module, attribute, LinearGroup(group))
    for module in linears:
        module.forward = LinearGroup([module], single=True)  # an instance attribute: state-dict names stay as they are
    return len(linears)
