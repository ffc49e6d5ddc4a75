"""`mllm ground`: find a referring expression in an image; print the box and draw it.

    mllm ground --image scene.png "the red star" [--model DIR] [--out scene.ground.png] [--style plain|qwen]

The model is asked with the grounding prompt (`GROUNDING_PROMPT` for the plain style), greedily. The answer's
box is read with `parse_box`, mapped from the 0..1000 grid to pixels of the original image (unpadded frame by
default, the course's training convention; `--square-pad` for models trained on the exercise's padded frame,
in which case the image is padded white before it is shown to the model) and drawn in red.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mllm.cli.arguments import add_device_arguments, load_images, load_model, positive_int
from mllm.eval.grounding import ground


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mllm ground", description=__doc__.split("\n\n")[0])
    parser.add_argument("expression", help='what to find, e.g. "the red star"')
    parser.add_argument("--image", type=Path, required=True)
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the shipped tiny model)")
    parser.add_argument("--out", type=Path, default=None, help="picture to write (default <image>.ground.png)")
    parser.add_argument("--style", choices=("plain", "qwen"), default="plain")
    parser.add_argument("--square-pad", action="store_true", help="the model was trained on the padded frame")
    parser.add_argument("--max-new-tokens", type=positive_int, default=64)
    parser.add_argument("--system-prompt", default=None, help="default: the chat template's own (as in training)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    add_device_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    from mllm.eval.grounding_draw import draw_case

    image = load_images(parser, [args.image])[0]
    model, tokenizer, processor = load_model(parser, args)
    result = ground(model, tokenizer, processor, image, args.expression, args.style, args.square_pad,
                    max_new_tokens=args.max_new_tokens, system_prompt=args.system_prompt)
    out = args.out or args.image.with_name(args.image.stem + ".ground.png")
    caption = args.expression if result["pixel_box"] else f"{args.expression} (no box in {result['answer']!r})"
    draw_case(image, caption, pred=result["pixel_box"]).save(out)
    result["picture"] = str(out)
    if args.json:
        print(json.dumps(result))
    elif result["pixel_box"] is None:
        print(f"no box found in the answer {result['answer']!r}; picture: {out}")
    else:
        x0, y0, x1, y1 = result["pixel_box"]
        print(f"{args.expression}: pixels [{x0:g}, {y0:g}, {x1:g}, {y1:g}] in the {image.width}x{image.height} image "
              f"(grid {format_grid(result['grid_box'])}, answer {result['answer']!r}); picture: {out}")
    return 0 if result["pixel_box"] is not None else 1


def format_grid(box) -> str:
    return "[" + ",".join(f"{v:g}" for v in box) + "]"

