"""`mllm chat`: talk about an image. With a question it streams one answer; without, it is an interactive
multi-turn chat (empty line or Ctrl-D ends it, `/image FILE` switches the image)."""

from __future__ import annotations

import argparse
import sys

from mllm.cli.arguments import add_device_arguments, load_images, load_model, positive_int


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mllm chat", description=__doc__.split("\n")[0])
    parser.add_argument("question", nargs="?", help="one question; leave out for an interactive chat")
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the shipped tiny model)")
    parser.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
    parser.add_argument("--decoding", choices=["greedy", "sample", "beam"], default="greedy")
    parser.add_argument("--max-new-tokens", type=positive_int, default=256)
    parser.add_argument("--system-prompt", default=None)
    add_device_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    images = load_images(parser, args.image)
    model, tokenizer, processor = load_model(parser, args)

    def reply(msgs: list[dict]) -> str:
        # Beam search cannot stream; it prints its answer whole.
        stream = args.decoding != "beam"
        result = model.chat(images, msgs, tokenizer, processor=processor, stream=stream, decoding=args.decoding,
                            system_prompt=args.system_prompt, max_new_tokens=args.max_new_tokens)
        pieces = []
        for piece in (result if stream else [result]):
            pieces.append(piece)
            print(piece, end="", flush=True)
        print()
        return "".join(pieces)

    if args.question:
        reply([{"role": "user", "content": args.question}])
        return 0

    msgs: list[dict] = []
    print("Interactive chat. Empty line or Ctrl-D to quit; /image FILE to switch images.", file=sys.stderr)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        if line.startswith("/image "):
            from mllm.model.image_processing import load_image

            try:
                images = [load_image(line.split(" ", 1)[1].strip())]
                msgs = []
                print("(new image; conversation restarted)", file=sys.stderr)
            except (ValueError, FileNotFoundError) as err:
                print(f"error: {err}", file=sys.stderr)
            continue
        msgs.append({"role": "user", "content": line})
        print("model> ", end="", flush=True)
        msgs.append({"role": "assistant", "content": reply(msgs)})
    return 0
