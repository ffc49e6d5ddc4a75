"""`mllm web`: a web demo (gradio) of a model: chat about images, ground expressions, try fresh synthetic scenes.

    mllm web [--model DIR] [--host 127.0.0.1] [--port 7860] [--share]

Serves on loopback by default; open the printed address in a browser.
"""

from __future__ import annotations

import argparse
import sys

from mllm.cli.arguments import add_device_arguments, add_listen_arguments, load_model


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mllm web", description=__doc__.split("\n")[0].split(": ", 1)[1])
    add_listen_arguments(parser, "demo", 7860, any_port=False)
    parser.add_argument("--share", action="store_true",
                        help="also open a public link through gradio's share service (anyone with it can use the "
                             "model)")
    add_device_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    model, tokenizer, processor = load_model(parser, args)
    from mllm.serve.web import launch

    try:
        launch(model, tokenizer, processor, host=args.host, port=args.port, share=args.share,
               announce=lambda url: print(f"mllm web: serving on {url} (Ctrl-C stops)", flush=True))
    except KeyboardInterrupt:
        print("mllm web: stopped", file=sys.stderr)
    except OSError as err:  # the port is taken, the address is not ours ...
        print(f"mllm web: cannot listen on {args.host}:{args.port}: {err}", file=sys.stderr)
        return 2
    return 0
