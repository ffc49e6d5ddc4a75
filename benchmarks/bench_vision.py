"""The vision side against transformers, one process, interleaved: the vision encoder and image preprocessing.

1. Vision encoder: ours (`SiglipVisionTransformer`, views packed as patch strips) against transformers'
   `Idefics2VisionTransformer` (the NaViT SigLIP MiniCPM-V's tower is) holding the same random weights, on the
   10 views of one sliced image (source + 3x3 slices, 32x32 patches each), at the shipped tiny model's sizes and
   at a wider one; outputs checked equal (1e-4).
2. Preprocessing: one 1344x1344 image into its 10 views (source + 3x3 slices of 448x448, BICUBIC, normalised),
   ours (`ImageProcessor`) against transformers' MiniCPM-V image processor (`MiniCPMV4_6ImageProcessorPil`, whose
   slicing gives the same 10 views for this size).

Ratios: transformers time / ours time per interleaved pair (> 1: ours faster), median (min-max), CPU time of the
pinned thread.

    python benchmarks/bench_vision.py [--quick] [--threads 1]
"""

from __future__ import annotations

import time

import numpy as np
import torch
from PIL import Image
from transformers.models.idefics2.configuration_idefics2 import Idefics2VisionConfig
from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionTransformer

from harness import benchmark_arguments, fmt_ratio, interleaved, pin, ratio
from mllm.model.configuration import VisionConfig
from mllm.model.image_processing import ImageProcessor
from mllm.model.cpu_linear import pack_linears
from mllm.model.vision import SiglipVisionTransformer, pack_patch_strips

PATCH = 14
SIZES = {"tiny model's tower": dict(hidden_size=128, intermediate_size=512, num_attention_heads=4, num_hidden_layers=3),
         "wider tower": dict(hidden_size=384, intermediate_size=1536, num_attention_heads=6, num_hidden_layers=6)}


def encoder_case(sizes: dict, views: int = 10, side: int = 32, rounds: int = 5) -> tuple:
    config = dict(sizes, image_size=448, patch_size=PATCH)
    torch.manual_seed(0)
    ours = SiglipVisionTransformer(VisionConfig(**config)).eval()
    theirs = Idefics2VisionTransformer(Idefics2VisionConfig(**config)).eval()
    theirs.load_state_dict(ours.state_dict())
    pack_linears(ours)  # as `load_pretrained` leaves it on the CPU
    images = torch.randn(views, 3, side * PATCH, side * PATCH)
    grid = images.reshape(views, 3, side, PATCH, side, PATCH)  # (V, C, h, p, w, p)
    strips = grid.permute(0, 1, 3, 2, 4, 5).reshape(views, 3, PATCH, side * side * PATCH)  # patches side by side
    pixel_values, mask = pack_patch_strips(list(strips))
    sizes_t = torch.tensor([[side, side]] * views, dtype=torch.int32)
    full = torch.ones(views, side, side, dtype=torch.bool)
    with torch.inference_mode():
        a = ours(pixel_values, mask, sizes_t)
        b = theirs(images, patch_attention_mask=full).last_hidden_state
        assert (a - b).abs().max().item() < 1e-4, "the two towers disagree"
        # ours is timed from the views' patch strips (packing included, as the model does it)
        t = interleaved({"ours": lambda: ours(*pack_patch_strips(list(strips)), sizes_t),
                         "theirs": lambda: theirs(images, patch_attention_mask=full)}, rounds)
    return ratio(t["theirs"].cpu, t["ours"].cpu), views / t["ours"].median()


def preprocessing_case(rounds: int) -> tuple:
    from transformers.models.minicpmv4_6.image_processing_pil_minicpmv4_6 import MiniCPMV4_6ImageProcessorPil

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (1344, 1344, 3), dtype=np.uint8))
    ours = ImageProcessor(max_slice_nums=9, scale_resolution=448, patch_size=14)
    theirs = MiniCPMV4_6ImageProcessorPil(max_slice_nums=9, scale_resolution=448, patch_size=14,
                                          downsample_mode="4x")
    assert len(ours(image)["pixel_values"]) == 10
    t = interleaved({"ours": lambda: ours(image), "theirs": lambda: theirs(image, return_tensors="pt")}, rounds)
    return ratio(t["theirs"].cpu, t["ours"].cpu), 1 / t["ours"].median()


def main():
    args = benchmark_arguments(__doc__)
    cores = pin(args.threads)
    rounds = 3 if args.quick else 9
    start = time.perf_counter()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s) pinned to cores {cores}; {rounds} rounds; "
          f"ratios = transformers time / ours time, median (min-max)\n")
    for name, sizes in SIZES.items():
        r, per_s = encoder_case(sizes, rounds=rounds)
        print(f"vision encoder, {name} (width {sizes['hidden_size']}, {sizes['num_hidden_layers']} layers), 10 views "
              f"of 32x32 patches: {fmt_ratio(r)}  (ours {per_s:.1f} views/s)", flush=True)
    r, per_s = preprocessing_case(rounds)
    print(f"preprocessing, 1344x1344 -> 10 views: {fmt_ratio(r)}  (ours {per_s:.1f} images/s)")
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
